"""Operating a worker: metrics, health, `fmnist status`, JSON logs, hot reload, the Open Inference
Protocol and trace context, against real `fmnist serve` processes and the real brokers.

One worker per broker (`serve --metrics-port P --log-format json --reload`, weights copied to a
temporary folder) is shared by this module's tests; each test measures what it changed
(counter deltas, log lines written since it began), so the order of tests does not matter,
except that the hot reload test swaps the model (every other test reads the version served
from the answers, never assumes it).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from fmnist import config
from fmnist.brokers import Message, OutMessage, connect
from fmnist.data import CLASS_NAMES
from fmnist.model import artifacts
from fmnist.serving import protocol
from fmnist.serving.metrics import STUCK_AFTER_S
from fmnist.testing.processes import FMNIST, ROOT, WorkerProcess
from fmnist.testing.topics import Topics
from fmnist.testing.waiting import http_get as get
from fmnist.testing.waiting import poll_until

pytestmark = pytest.mark.slow
LABELS = json.loads((ROOT / "Images" / "labels.json").read_text())
IMAGES = {name: (ROOT / "Images" / name).read_bytes() for name in sorted(LABELS)}
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# -- helpers -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])




class Scrape:
    """One /metrics scrape: value(name, **labels) of a sample, 0 when absent."""

    def __init__(self, text: str) -> None:
        self.samples = [s for family in text_string_to_metric_families(text)
                        for s in family.samples]

    def value(self, metric: str, /, **labels: str) -> float:
        return sum(s.value for s in self.samples
                   if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()))

    def series(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.samples)


@dataclass
class Served:
    """A running worker of one broker, its topics, health port and weights folder."""

    broker: str
    topics: Topics
    port: int
    weights: Path  # the .keras file the worker serves (and watches)
    process: WorkerProcess
    log_path: Path
    cfg: config.Config = field(init=False)

    def __post_init__(self) -> None:
        self.cfg = self.topics.config()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def scrape(self) -> Scrape:
        code, text = get(self.url("/metrics"))
        assert code == 200, text
        return Scrape(text)

    def log_lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def request(self, payload: bytes, rid: str | None = None, content_type: str = "image/png",
                **headers: str) -> OutMessage:
        rid = rid or f"r-{uuid.uuid4().hex[:12]}"
        return OutMessage(self.topics.request, payload, key=rid,
                          headers={**protocol.request_headers(rid, content_type), **headers})

    def exchange(self, messages: list[OutMessage], timeout: float = 90, dead_letters: int = 0
                 ) -> tuple[dict[str, Message], dict[str, Message]]:
        """Publish; return the first answer per request id, and as many dead letters as asked
        for (by the request id they name)."""
        broker = connect(self.broker, self.cfg)
        readers = {"answers": broker.consumer(self.topics.response, group=None)}
        if dead_letters:
            readers["dlq"] = broker.consumer(self.topics.dlq, group=None)
        wanted = {m.headers[protocol.REQUEST_ID] for m in messages}
        got: dict[str, dict[str, Message]] = {name: {} for name in readers}
        try:
            broker.producer().publish(messages, timeout_s=30)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for name, reader in readers.items():
                    for message in reader.next_batch(500, timeout_s=0.2):
                        rid = message.headers.get(protocol.REQUEST_ID) or message.headers.get(
                            "dlq_request_id", "")
                        got[name].setdefault(rid, message)
                if wanted <= got["answers"].keys() and len(got.get("dlq", {})) >= dead_letters:
                    break
        finally:
            for reader in readers.values():
                reader.close()
            broker.close()
        missing = wanted - got["answers"].keys()
        assert not missing, f"{len(missing)} of {len(wanted)} unanswered\n" + self.tail()
        return got["answers"], got.get("dlq", {})

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_lines()[-n:])


def fmnist_status(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMNIST_")}
    return subprocess.run([*FMNIST, "status", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def source_weights() -> Path:
    """The project's trained model (weights/fmnist.keras unless FMNIST_MODEL__* say otherwise)."""
    weights = config.load().weights_path
    assert weights.is_file() and artifacts.meta_path(weights).is_file(), (
        f"{weights} (and its meta.json) is needed: train it with `fmnist train`.")
    return weights


def copy_model(weights: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(weights, folder / weights.name)
    shutil.copy2(artifacts.meta_path(weights), artifacts.meta_path(folder / weights.name))
    return folder / weights.name


def new_version(weights: Path, folder: Path) -> Path:
    """The same model saved again with every final bias raised by the same small amount: the
    softmax (so every answer) is unchanged, the file and so the model version are not.
    Edits the archive's weights with h5py, so no TensorFlow is needed in the test process."""
    out = folder / weights.name
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(weights) as source, zipfile.ZipFile(out, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "model.weights.h5":
                data = nudge_final_bias(data)
            target.writestr(item, data)
    meta = json.loads(artifacts.meta_path(weights).read_text())
    meta["version"] = artifacts.file_version(out)
    artifacts.meta_path(out).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def nudge_final_bias(h5: bytes) -> bytes:
    import h5py

    buffer = io.BytesIO(h5)
    with h5py.File(buffer, "r+") as f:
        biases = []
        f["layers"].visititems(lambda name, obj: biases.append(obj)
                               if getattr(obj, "shape", None) == (len(CLASS_NAMES),) else None)
        assert biases, "no final bias of shape (10,) in the weights"
        biases[-1][...] = biases[-1][...] + np.float32(1e-3)
    return buffer.getvalue()


def replace_model(weights: Path, source: Path, meta_source: Path | None = None) -> None:
    """The documented procedure: stage both files beside the live ones, then rename each over
    its twin (atomic), meta first."""
    meta_source = meta_source or artifacts.meta_path(source)
    staged = weights.with_name(f".staged-{uuid.uuid4().hex[:6]}")
    shutil.copyfile(meta_source, staged.with_suffix(".json"))
    shutil.copyfile(source, staged.with_suffix(".keras"))
    os.replace(staged.with_suffix(".json"), artifacts.meta_path(weights))
    os.replace(staged.with_suffix(".keras"), weights)


def pixels(name: str) -> list[list[int]]:
    image = Image.open(io.BytesIO(IMAGES[name]))
    assert image.mode == "L" and image.size == (28, 28), name
    return np.asarray(image, np.uint8).tolist()


def json_blocks(markdown: Path, heading: str) -> list[Any]:
    """The ```json blocks of one section (## or ###) of a Markdown file, parsed."""
    text = markdown.read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    section = text[start:end if end != -1 else None]
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", section, re.S)]


# -- fixtures ----------------------------------------------------------------------------------

def start_served(broker: str, folder: Path, weights: Path, *args: str, **env: str) -> Served:
    topics = Topics(broker)
    port = free_port()
    log_path = folder / f"worker-{broker}.log"
    process = WorkerProcess(topics, log_path, "--metrics-port", str(port), "--log-format",
                            "json", *args, env={"FMNIST_MODEL__WEIGHTS_DIR": str(weights.parent),
                                                "FMNIST_MODEL__NAME": weights.stem, **env})
    return Served(broker, topics, port, weights, process, log_path)


@pytest.fixture(scope="module", params=[pytest.param("kafka", marks=pytest.mark.kafka),
                                        pytest.param("pubsub", marks=pytest.mark.pubsub)])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp(f"ops-{request.param}")
    weights = copy_model(source_weights(), folder / "weights")
    worker = start_served(request.param, folder, weights, "--reload")
    try:
        poll_until(lambda: get(worker.url("/readyz"))[0] == 200, 120,
                   message=f"{request.param} worker ready\n{worker.log_path}")
        yield worker
    finally:
        rc = worker.process.stop()
        assert rc == 0, worker.tail()


def send_and_settle(served: Served, messages: list[OutMessage], dead_letters: int = 0
                    ) -> tuple[dict[str, Message], dict[str, Message]]:
    """exchange(), then wait until the worker has also counted them (its observer runs after
    the commit, which is after the answers are published)."""
    before = served.scrape().value("fmnist_requests_total")
    answers, dead = served.exchange(messages, dead_letters=dead_letters)
    poll_until(lambda: served.scrape().value("fmnist_requests_total") >= before + len(messages),
               30, message="the worker counting what it answered")
    return answers, dead


# -- 1. Prometheus -----------------------------------------------------------------------------

def test_metrics_move_by_exactly_what_was_sent(served: Served) -> None:
    before = served.scrape()
    good = [served.request(payload) for payload in list(IMAGES.values()) * 3]
    bad = [served.request(b""), served.request(b"%!PS-Adobe-3.0 EPSF"),
           served.request(b"junk that is no image")]
    answers, _ = send_and_settle(served, good + bad)
    after = served.scrape()

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    b = served.broker
    assert delta("fmnist_requests_total", broker=b, outcome="ok") == len(good)
    assert delta("fmnist_requests_total", broker=b, outcome="error") == len(bad)
    assert delta("fmnist_errors_total", code="empty_payload") == 1
    assert delta("fmnist_errors_total", code="unsupported_format") == 2
    for histogram in ("fmnist_queue_wait_seconds", "fmnist_end_to_end_seconds"):
        assert delta(f"{histogram}_count") == len(good + bad), histogram  # all carry sent_at
        assert delta(f"{histogram}_sum") > 0, histogram
    assert delta("fmnist_batch_size_sum") == len(good + bad)
    batches = delta("fmnist_batch_size_count")
    assert 1 <= batches <= len(good + bad)
    assert delta("fmnist_inference_seconds_count") == batches
    assert after.has("fmnist_in_flight_requests")
    poll_until(lambda: served.scrape().value("fmnist_in_flight_requests") == 0, 10,
               message="nothing in flight once all is answered")

    bodies = [json.loads(m.value) for m in answers.values()]
    (model,) = {(a["model"]["name"], a["model"]["version"]) for a in bodies}
    assert after.series("fmnist_model_info") == [{"name": model[0], "version": model[1]}]
    assert after.value("fmnist_model_info", name=model[0], version=model[1]) == 1

    lag = after.series("fmnist_kafka_consumer_lag")
    if served.broker == "kafka":
        from fmnist.brokers.kafka import KafkaTopicConsumer

        assert hasattr(KafkaTopicConsumer, "lag"), (
            "fmnist_kafka_consumer_lag needs KafkaTopicConsumer.lag() (see docs/operations.md)")
        assert lag and {s["topic"] for s in lag} == {served.topics.request}
        poll_until(lambda: served.scrape().value("fmnist_kafka_consumer_lag") == 0, 15,
                   message="consumer lag back to 0 once everything is read")
    else:
        assert lag == []  # Pub/Sub has no partitions: its backlog is a Cloud Monitoring metric


# -- 2. health and `fmnist status` -------------------------------------------------------------

def test_health_endpoints_and_status_of_a_ready_worker(served: Served) -> None:
    assert get(served.url("/healthz")) == (200, "ok\n")
    assert get(served.url("/readyz")) == (200, "ready\n")
    assert get(served.url("/nope"))[0] == 404
    send_and_settle(served, [served.request(IMAGES["bag8.png"]), served.request(b"")])

    shown = fmnist_status("--port", str(served.port), "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    _, text = get(served.url("/status"))
    assert status["ready"] is True and status["alive"] is True
    assert status["broker"] == served.broker and status["broker_state"] == "connected"
    assert status["processed"] == status["ok"] + status["errors"] >= 2
    assert status["error_codes"].get("empty_payload", 0) >= 1
    assert status["model"] == json.loads(text)["model"]
    table = fmnist_status("--port", str(served.port))
    assert table.returncode == 0, table.stderr
    assert "processed" in table.stdout and served.broker in table.stdout

    unreachable = fmnist_status("--port", str(free_port()))
    assert unreachable.returncode == 4
    assert "No worker answers" in unreachable.stderr


@pytest.mark.kafka
def test_unreachable_kafka_is_unready_but_alive(tmp_path: Path) -> None:
    """Liveness must not fail while the worker retries a dead broker: restarting it would not
    bring Kafka back. Checked for longer than the loop-stuck threshold."""
    worker = start_served("kafka", tmp_path, copy_model(source_weights(), tmp_path / "weights"),
                          FMNIST_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:1")
    try:
        poll_until(lambda: get(worker.url("/healthz"))[0] == 200, 120, message="health server")
        started = time.monotonic()

        def probed_long_enough() -> bool:  # what a kubelet would see, once a second
            assert get(worker.url("/healthz"))[0] == 200, worker.tail()
            code, text = get(worker.url("/readyz"))
            assert code == 503 and text.startswith("not ready: "), text
            return time.monotonic() - started > STUCK_AFTER_S + 5

        poll_until(probed_long_enough, STUCK_AFTER_S + 60, interval=1)
        shown = fmnist_status("--port", str(worker.port), "--json")
        assert shown.returncode == 4, shown.stdout + shown.stderr
        assert json.loads(shown.stdout)["ready"] is False
        retries = [json.loads(line) for line in worker.log_lines()
                   if "127.0.0.1:1" in line and "retrying" in line]
        assert len(retries) >= 3 and retries[0]["level"] == "warning"
    finally:
        assert worker.process.stop() == 0, worker.tail()


# -- 3. logs -----------------------------------------------------------------------------------

def test_json_logs_and_no_line_per_request(served: Served) -> None:
    mark = len(served.log_lines())
    messages = [served.request(payload) for payload in list(IMAGES.values()) * 20]  # 200
    answers, _ = send_and_settle(served, messages)
    assert len(answers) == 200
    lines = served.log_lines()
    for line in lines:  # from start-up on, every line is one JSON object
        entry = json.loads(line)
        assert {"ts", "level", "event", "worker_id"} <= entry.keys(), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"]), line
    during = lines[mark:]
    assert len(during) <= 5, "\n".join(during)  # 200 requests, no line per request
    assert not [line for line in during if any(rid in line for rid in answers)], during
    worker_ids = {json.loads(line)["worker_id"] for line in lines}
    assert worker_ids == {json.loads(next(iter(answers.values())).value)["worker_id"]}


# -- 5. Open Inference Protocol ----------------------------------------------------------------

def test_open_inference_protocol_example_from_the_docs(served: Served) -> None:
    doc_request, doc_response, doc_error = json_blocks(ROOT / "docs" / "protocol.md",
                                                       "## Open Inference Protocol")
    names = sorted(IMAGES)
    batch = {**doc_request, "id": "oip-batch",
             "inputs": [{**doc_request["inputs"][0], "shape": [len(names), 28, 28],
                         "data": [pixels(n) for n in names]}]}
    malformed = {**doc_request, "id": "oip-bad",
                 "inputs": [{**doc_request["inputs"][0], "data": [1, 2, 3]}]}
    sent = {
        "doc": served.request(json.dumps(doc_request).encode(), content_type="application/json"),
        "batch": served.request(json.dumps(batch).encode(), content_type="application/json"),
        "bad": served.request(json.dumps(malformed).encode(), content_type="application/json"),
    }
    answers, dead = send_and_settle(served, list(sent.values()), dead_letters=1)

    def answer(key: str) -> dict[str, Any]:
        return json.loads(answers[sent[key].headers[protocol.REQUEST_ID]].value)

    doc, many = answer("doc"), answer("batch")
    assert doc.keys() == doc_response.keys() == {"model_name", "model_version", "id", "outputs"}
    assert doc["id"] == doc_request["id"] and many["id"] == "oip-batch"
    for body, n in ((doc, doc_request["inputs"][0]["shape"][0]), (many, len(names))):
        probabilities, label = body["outputs"]
        assert [o["name"] for o in body["outputs"]] == [o["name"] for o in doc_response["outputs"]]
        assert probabilities["shape"] == [n, 10] and probabilities["datatype"] == "FP32"
        rows = np.array(probabilities["data"]).reshape(n, 10)
        assert np.allclose(rows.sum(axis=1), 1, atol=1e-3)
        assert label["shape"] == [n] and label["datatype"] == "INT64"
        assert label["data"] == rows.argmax(axis=1).tolist()
        assert body["model_name"] and len(body["model_version"]) == 12
    assert doc["outputs"][1]["data"] == doc_response["outputs"][1]["data"]  # the doc's sneaker
    assert many["outputs"][1]["data"] == [LABELS[n]["label"] for n in names]

    bad_id = sent["bad"].headers[protocol.REQUEST_ID]
    bad = answers[bad_id]
    assert json.loads(bad.value) == doc_error
    assert bad.headers[protocol.ERROR_CODE] == "invalid_request"
    assert dead[bad_id].headers["dlq_error_code"] == "invalid_request"
    assert dead[bad_id].value == sent["bad"].value  # the original bytes


# -- 6. trace context --------------------------------------------------------------------------

def test_traceparent_is_copied_onto_the_answer(served: Served) -> None:
    ok = served.request(IMAGES["coat4.png"], traceparent=TRACEPARENT)
    failed = served.request(b"", traceparent=TRACEPARENT.replace("00f0", "11f1"))
    invalid = served.request(IMAGES["coat4.png"], traceparent="not-a-traceparent")
    plain = served.request(IMAGES["coat4.png"])
    answers, _ = served.exchange([ok, failed, invalid, plain])

    def traceparent(message: OutMessage) -> str | None:
        return answers[message.headers[protocol.REQUEST_ID]].headers.get(protocol.TRACEPARENT)

    assert traceparent(ok) == TRACEPARENT
    assert traceparent(failed) == TRACEPARENT.replace("00f0", "11f1")  # errors too
    assert traceparent(invalid) is None  # W3C: an invalid one is dropped, not propagated
    assert traceparent(plain) is None


# -- 4. hot reload (last: it changes the model the shared worker serves) -----------------------

class Load(threading.Thread):
    """Publishes one request at a time at ``rate`` per second until stopped; records sent_at."""

    def __init__(self, served: Served, rate: float) -> None:
        super().__init__(name="load", daemon=True)
        self.served, self.interval = served, 1 / rate
        self.sent: dict[str, float] = {}  # request id -> sent_at (s)
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        broker = connect(self.served.broker, self.served.cfg)
        try:
            producer = broker.producer()
            payloads = list(IMAGES.values())
            next_at = time.monotonic()
            while not self.halt.is_set():
                message = self.served.request(payloads[len(self.sent) % len(payloads)])
                sent_at = int(message.headers[protocol.SENT_AT]) / 1000
                producer.publish([message], timeout_s=10)
                self.sent[message.headers[protocol.REQUEST_ID]] = sent_at
                next_at += self.interval
                self.halt.wait(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            broker.close()


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


@pytest.mark.parametrize("served", [pytest.param("kafka", marks=pytest.mark.kafka)],
                         indirect=True)
def test_hot_reload_under_load_loses_nothing_and_refuses_broken_files(
        served: Served, tmp_path: Path) -> None:
    original = copy_model(served.weights, tmp_path / "v1")
    v2 = new_version(original, tmp_path / "v2")
    v1_version, v2_version = artifacts.file_version(original), artifacts.file_version(v2)
    assert v1_version != v2_version
    assert served.scrape().series("fmnist_model_info")[0]["version"] == v1_version

    def reloads(result: str) -> float:
        return served.scrape().value("fmnist_model_reloads_total", result=result)

    # -- swap v1 -> v2 under a steady load
    broker = connect(served.broker, served.cfg)
    reader = broker.consumer(served.topics.response, group=None)
    answers: dict[str, tuple[dict[str, Any], float]] = {}

    def read(until: float) -> None:
        while time.monotonic() < until:
            for m in reader.next_batch(500, timeout_s=0.2):
                answers.setdefault(m.headers[protocol.REQUEST_ID], (json.loads(m.value),
                                                                     m.received_at))

    ok_before = reloads("ok")
    load = Load(served, rate=40)
    load.start()
    try:
        read(time.monotonic() + 8)  # steady state
        swapped_at = time.time()
        replace_model(served.weights, v2)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
                a["model"]["version"] == v2_version for a, _ in answers.values()):
            read(time.monotonic() + 0.5)
        new_from = min((at for a, at in answers.values() if a["model"]["version"] == v2_version),
                       default=None)
        assert new_from is not None, "no answer from the new version\n" + served.tail()
        read(time.monotonic() + 4)  # and a while after the swap
    finally:
        load.halt.set()
        load.join(30)
    assert load.error is None, load.error
    read(time.monotonic() + 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not load.sent.keys() <= answers.keys():
        read(time.monotonic() + 0.5)
    reader.close()
    broker.close()

    assert load.sent.keys() <= answers.keys(), "a request was lost during the swap"
    assert all(a["status"] == "ok" for a, _ in answers.values()), "errors during the swap"
    by_sent = sorted(load.sent, key=load.sent.__getitem__)
    versions = [answers[rid][0]["model"]["version"] for rid in by_sent]
    assert set(versions) == {v1_version, v2_version}
    first_new = versions.index(v2_version)
    assert set(versions[first_new:]) == {v2_version}, "an old answer after the new version"
    assert reloads("ok") == ok_before + 1  # both files replaced: one load, not two
    assert served.scrape().series("fmnist_model_info")[0]["version"] == v2_version
    assert any(f"now serving {original.stem}@{v2_version}" in line for line in served.log_lines())

    latency = {rid: (answers[rid][1] - load.sent[rid]) * 1000 for rid in load.sent}
    steady = [latency[rid] for rid in by_sent if load.sent[rid] < swapped_at]
    during = [latency[rid] for rid in by_sent if swapped_at <= load.sent[rid] <= new_from + 1]
    print(f"\nhot reload at 40 req/s: p99 steady {p99(steady):.1f} ms (n={len(steady)}), "
          f"during the swap {p99(during):.1f} ms (n={len(during)}), "
          f"max during {max(during):.1f} ms, swap took {new_from - swapped_at:.1f} s")
    assert p99(during) <= 2 * p99(steady) + 250, "the swap stalled serving"

    # -- broken files are refused, the current version serves on
    def refused_with(reason: str, make_broken: Any) -> None:
        before, mark = reloads("refused"), len(served.log_lines())
        make_broken()
        poll_until(lambda: reloads("refused") == before + 1, 30, message="a refusal")
        logged = [json.loads(line) for line in served.log_lines()[mark:]
                  if "reload refused" in line]
        assert logged and logged[0]["level"] == "error" and reason in logged[0]["event"], logged
        answers, _ = served.exchange([served.request(IMAGES["dress3.png"])])
        (answer,) = [json.loads(m.value) for m in answers.values()]
        assert answer["status"] == "ok" and answer["model"]["version"] == v2_version
        assert answer["class_name"] == "Dress"

    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(original.read_bytes()[: original.stat().st_size // 2])
    refused_with("could not be loaded", lambda: replace_model(
        served.weights, truncated, artifacts.meta_path(original)))
    wrong_classes = tmp_path / "wrong.meta.json"
    meta = json.loads(artifacts.meta_path(original).read_text())
    wrong_classes.write_text(json.dumps({**meta, "class_names": meta["class_names"][::-1]}))
    refused_with("class names differ", lambda: replace_model(
        served.weights, original, wrong_classes))
    assert served.scrape().series("fmnist_model_info")[0]["version"] == v2_version

    # -- back to v1 by the watcher, then SIGHUP reloads on demand
    ok_before = reloads("ok")
    replace_model(served.weights, original)
    poll_until(lambda: reloads("ok") == ok_before + 1, 30, message="the watcher's reload")
    served.process.proc.send_signal(signal.SIGHUP)
    poll_until(lambda: reloads("ok") == ok_before + 2, 30, message="SIGHUP's reload")
    assert served.scrape().series("fmnist_model_info")[0]["version"] == v1_version
    assert served.process.proc.poll() is None
