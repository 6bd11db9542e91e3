"""Feedback against the real brokers: labelled requests answered by a worker (`fmnist serve` in a
subprocess) and recorded on the feedback topic, `fmnist feedback` after the fact, accuracy per
model version from the topic and the worker's /metrics, and training with the labelled images,
locally and as a job."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fmnist import client, config, feedback
from fmnist.brokers import OutMessage, connect
from fmnist.testing.processes import FMNIST, ROOT, WorkerProcess
from fmnist.testing.run import IMAGES, LABELS, WORKER_START_S, free_port
from fmnist.testing.topics import Topics
from fmnist.testing.waiting import http_get, poll_until
from tests.integration.test_jobs import JobsSetup, events_broker, jobs  # noqa: F401

pytestmark = pytest.mark.slow


@dataclass
class Served:
    """One worker on private topics, with a feedback topic and a sent cache of its own."""

    broker: str
    topics: Topics
    feedback_topic: str
    sent_dir: Path
    port: int
    worker: WorkerProcess

    def env(self) -> dict[str, str]:
        return self.topics.env({"FMNIST_FEEDBACK__TOPIC": self.feedback_topic,
                                "FMNIST_FEEDBACK__SENT_DIR": str(self.sent_dir),
                                "FMNIST_SERVE__BROKER": self.broker})

    def config(self) -> config.Config:
        return config.load(env=self.env(), flags=dict(self.topics.routing()))

    def fmnist(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*FMNIST, *args], cwd=ROOT, env=self.env(), capture_output=True,
                              text=True, timeout=timeout)

    def records(self, ids: set[str], timeout: float = 60) -> dict[str, feedback.Record]:
        """The feedback topic's records of these requests, once all of them are there."""
        found: dict[str, feedback.Record] = {}

        def all_there() -> bool:
            b = connect(self.broker, self.config())
            try:
                found.update({r.request_id: r for r in feedback.read(b, self.config())
                              if r.request_id in ids})
            finally:
                b.close()
            return set(found) == ids

        poll_until(all_there, timeout, interval=0.2,
                   message=f"feedback records of {sorted(ids)} (have {sorted(found)})")
        return found

    def metric(self, name: str, **labels: str) -> float | None:
        _, text = http_get(f"http://127.0.0.1:{self.port}/metrics")
        for line in text.splitlines():
            match = re.match(rf"{name}{{(.*)}} (\S+)$", line)
            if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
                return float(match.group(2))
        return None


@pytest.fixture(scope="module", params=[pytest.param("kafka", marks=pytest.mark.kafka),
                                        pytest.param("pubsub", marks=pytest.mark.pubsub)])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp(f"feedback-{request.param}")
    topics, port = Topics(request.param), free_port()
    feedback_topic = f"feedback-{uuid.uuid4().hex[:10]}"
    worker = WorkerProcess(topics, folder / "worker.log", "--metrics-port", str(port),
                           env={"FMNIST_FEEDBACK__TOPIC": feedback_topic})
    served = Served(request.param, topics, feedback_topic, folder / "sent", port, worker)
    try:
        poll_until(lambda: http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200,
                   WORKER_START_S, interval=0.2, message=f"the worker ready\n{worker.log_path}")
        yield served
    finally:
        rc = worker.stop()
        b = connect(request.param, served.config())
        try:
            b.delete_topics([*topics.all(), feedback_topic])
        finally:
            b.close()
        assert rc == 0, worker.output()[-3000:]


def test_a_labelled_request_is_answered_recorded_and_counted(served: Served) -> None:
    before = {o: served.metric("fmnist_feedback_total", outcome=o) or 0.0
              for o in ("correct", "wrong")}
    sent = served.fmnist("send", "sneaker7.png", "sandal5.png", "--label", "sneaker", "--wait",
                         "--json")
    assert sent.returncode == 0, sent.stderr
    answers = {Path(a["file"]).name: a for a in json.loads(sent.stdout)}
    assert answers["sneaker7.png"]["feedback"] == {"label": 7, "correct": True, "recorded": True}
    assert answers["sandal5.png"]["label"] == 5
    assert answers["sandal5.png"]["feedback"] == {"label": 7, "correct": False,
                                                  "recorded": True}
    version = answers["sneaker7.png"]["model"]["version"]

    records = served.records({a["request_id"] for a in answers.values()})
    for name, answer in answers.items():
        r = records[answer["request_id"]]
        assert (r.label, r.predicted, r.model_version, r.source, r.image) == \
            (7, answer["label"], version, "request", IMAGES[name])
        assert r.worker_id == answer["worker_id"]

    def counted() -> bool:  # the worker counts a batch once its answers are confirmed
        return all(served.metric("fmnist_feedback_total", outcome=o, version=version)
                   == before[o] + 1 for o in ("correct", "wrong"))

    poll_until(counted, 30, interval=0.2, message="the worker counting both labelled answers")
    correct = served.metric("fmnist_feedback_total", outcome="correct", version=version)
    wrong = served.metric("fmnist_feedback_total", outcome="wrong", version=version)
    assert correct is not None and wrong is not None
    assert served.metric("fmnist_feedback_accuracy", version=version) == \
        pytest.approx(correct / (correct + wrong))


def test_feedback_labels_a_request_sent_before(served: Served) -> None:
    waited = served.fmnist("send", "top0.png", "--wait", "--json")
    assert waited.returncode == 0, waited.stderr
    (answer,) = json.loads(waited.stdout)
    assert "feedback" not in answer  # sent without a label: nothing recorded yet
    not_waited = served.fmnist("send", "trouser1.png", "--json")
    assert not_waited.returncode == 0, not_waited.stderr
    (plain,) = json.loads(not_waited.stdout)

    labelled = served.fmnist("feedback", answer["request_id"], "T-shirt", "--json")
    assert labelled.returncode == 0, labelled.stderr
    assert json.loads(labelled.stdout) | {"file": None} == {
        "request_id": answer["request_id"], "label": 0, "file": None, "predicted": 0,
        "correct": True, "model": answer["model"], "topic": served.feedback_topic,
        "broker": served.broker}
    later = served.fmnist("feedback", plain["request_id"], "1")
    assert later.returncode == 0, later.stderr
    assert "the answer was not waited for" in later.stdout

    records = served.records({answer["request_id"], plain["request_id"]})
    top, trouser = records[answer["request_id"]], records[plain["request_id"]]
    assert (top.label, top.predicted, top.model_version, top.source, top.image) == \
        (0, 0, answer["model"]["version"], "feedback", IMAGES["top0.png"])
    assert (trouser.label, trouser.predicted, trouser.source, trouser.image) == \
        (1, None, "feedback", IMAGES["trouser1.png"])


def test_feedback_for_a_request_not_sent_from_here_says_where_it_looked(served: Served) -> None:
    result = served.fmnist("feedback", "never-sent", "3")
    assert result.returncode == 3
    assert str(served.sent_dir) in result.stderr and "fmnist send" in result.stderr


def test_accuracy_by_version_counts_a_known_mix_of_right_and_wrong_labels(served: Served) -> None:
    """The 10 sample images, 7 with their true label and 3 with a wrong one: the shipped model
    classifies every sample right, so 7 of 10 labels agree with it."""
    names = sorted(LABELS)
    wrong = set(names[:3])
    cfg = served.config()
    outgoing = [dataclasses.replace(o, label=(LABELS[o.path.name]["label"] + 1) % 10
                                    if o.path.name in wrong else LABELS[o.path.name]["label"])
                for o in client.read_images(names)]
    b = connect(served.broker, cfg)
    try:
        answers = client.send(b, cfg, outgoing, wait=True, timeout_s=60)
    finally:
        b.close()
    assert all(a["status"] == "ok" and a["feedback"]["recorded"] for a in answers)
    version = answers[0]["model"]["version"]
    records = served.records({o.request_id for o in outgoing})
    assert feedback.accuracy_by_version(list(records.values())) == {
        version: {"name": answers[0]["model"]["name"], "labelled": 10, "correct": 7,
                  "accuracy": 0.7}}


def test_an_invalid_label_still_gets_its_prediction(served: Served) -> None:
    cfg = served.config()
    b = connect(served.broker, cfg)
    reader = b.consumer(cfg.broker.response_topic, group=None)
    try:
        rids = {"eleven": f"bad-{uuid.uuid4().hex[:8]}", "10": f"bad-{uuid.uuid4().hex[:8]}"}
        b.producer().publish([OutMessage(cfg.broker.request_topic, IMAGES["bag8.png"], key=rid,
                                         headers={"request_id": rid, "label": label})
                              for label, rid in rids.items()], timeout_s=10)
        answers = client.collect(reader, set(rids.values()), 60)
    finally:
        reader.close()
        b.close()
    assert set(answers) == set(rids.values())
    for answer in answers.values():
        assert answer["status"] == "ok" and answer["class_name"] == "Bag"
        assert answer["feedback"]["recorded"] is False
    # Nothing was recorded for them: a labelled request sent after them is, and they are not.
    sent = served.fmnist("send", "bag8.png", "--label", "8", "--json")
    assert sent.returncode == 0, sent.stderr
    (after,) = json.loads(sent.stdout)
    served.records({after["request_id"]})
    b = connect(served.broker, cfg)
    try:
        ids = {r.request_id for r in feedback.read(b, cfg)}
    finally:
        b.close()
    assert not ids & set(rids.values())
    assert "is not 0-9" in served.worker.output()


# -- training --------------------------------------------------------------------------------

TRAIN = ["--epochs", "1", "--limit", "2000"]


def publish_records(broker_name: str, cfg: config.Config) -> list[feedback.Record]:
    """The 10 sample images, labelled; one of them labelled twice (the newest label counts),
    and one record whose image does not decode (left out)."""
    records = [feedback.Record(f"fb-{name}", info["label"], IMAGES[name], "feedback", 1000 + i)
               for i, (name, info) in enumerate(sorted(LABELS.items()))]
    records.append(dataclasses.replace(records[0], label=3, time_ms=5000))
    records.append(feedback.Record("fb-junk", 4, b"not an image", "feedback", 6000))
    b = connect(broker_name, cfg)
    try:
        b.ensure_topics([cfg.feedback.topic])
        b.producer().publish([feedback.message(cfg.feedback.topic, r) for r in records], 30)
    finally:
        b.close()
    return records


def test_training_without_labelled_images_trains_anyway_and_says_so(
        broker_name: str, tmp_path: Path) -> None:
    topics, topic = Topics(broker_name), f"feedback-{uuid.uuid4().hex[:10]}"
    env = topics.env({"FMNIST_FEEDBACK__TOPIC": topic, "FMNIST_SERVE__BROKER": broker_name,
                      "FMNIST_TRAIN__TEACHER": "", "FMNIST_MODEL__WEIGHTS_DIR": str(tmp_path)})
    run = subprocess.run([*FMNIST, "train", "--with-feedback", *TRAIN, "--name", "empty"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"no labelled images on {topic} ({broker_name})" in run.stderr
    meta = json.loads((tmp_path / "empty.meta.json").read_text())
    assert meta["metrics"]["feedback_images"] == 0
    assert meta["feedback"]["images"] == meta["feedback"]["records"] == 0
    b = connect(broker_name, config.load(env=env))
    try:
        b.delete_topics([topic])
    finally:
        b.close()


def test_a_train_job_with_feedback_fits_on_the_labelled_images_too(
        jobs: JobsSetup, events_broker) -> None:  # noqa: F811
    topic = f"feedback-{uuid.uuid4().hex[:10]}"
    jobs.settings["FMNIST_FEEDBACK__TOPIC"] = topic  # the job worker's and the client's
    records = publish_records(jobs.broker_name, jobs.config())
    jobs.start_worker()
    run = jobs.fmnist("train", "--broker", jobs.broker_name, "--with-feedback", *TRAIN,
                      "--name", "withfb", "--json")
    assert run.returncode == 0, run.stderr[-3000:] + jobs.workers[-1].output()[-3000:]
    result = json.loads(run.stdout)
    assert result["status"] == "succeeded", result
    assert result["metrics"]["feedback_images"] == 10
    meta = json.loads((jobs.tmp / "w1" / "withfb.meta.json").read_text())
    assert meta["metrics"]["feedback_images"] == 10
    assert meta["feedback"] == {"images": 10, "records": 11, "topic": topic,
                                "broker": jobs.broker_name,
                                "sha256": feedback.checksum(records)}
    assert meta["config"]["train"]["with_feedback"] is True
    setup = [e for e in jobs.recorder.of(result["job_id"])
             if e["type"] == "progress" and e.get("phase") == "setup"]
    # --limit 2000: 200 validation images, 1,800 + 10 fitted on
    assert "1,810 training / 200 validation images" in setup[0]["summary"]
    assert f"+ 10 labelled images from {topic} ({jobs.broker_name})" in setup[0]["summary"]
    assert meta["metrics"]["batchnorm_reestimated_on"] == 1810
    b = connect(jobs.broker_name, jobs.config())
    try:
        b.delete_topics([topic])
    finally:
        b.close()


@pytest.mark.kafka
def test_the_documented_walkthrough_runs(tmp_path: Path) -> None:
    """docs/feedback.md's walkthrough as it stands, in bash, against a worker of its own (the
    doc's `serve` line, on a free port instead of 9100) on private topics."""
    text = (ROOT / "docs" / "feedback.md").read_text()
    script = re.search(r"<!-- feedback-walkthrough -->\s*```bash\n(.*?)```", text,
                       re.S).group(1)  # type: ignore[union-attr]
    serve = re.search(r"```bash\n(fmnist serve [^\n&]*)&?\n```", text).group(1)  # type: ignore[union-attr]
    port = free_port()
    topics, topic = Topics("kafka"), f"feedback-{uuid.uuid4().hex[:10]}"
    settings = {"FMNIST_FEEDBACK__TOPIC": topic, "FMNIST_FEEDBACK__SENT_DIR": str(tmp_path / "sent"),
                "FMNIST_MODEL__WEIGHTS_DIR": "weights"}
    args = serve.split()[2:]
    worker = WorkerProcess(topics, tmp_path / "worker.log", *[a if a != "9100" else str(port)
                                                              for a in args],
                           env={"FMNIST_FEEDBACK__TOPIC": topic})
    try:
        poll_until(lambda: http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200,
                   WORKER_START_S, interval=0.2, message=f"the worker ready\n{worker.log_path}")
        env = topics.env(settings)
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", script.replace("9100", str(port))],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        assert "Labelled " in run.stdout and "as 6 (Shirt)" in run.stdout
        assert re.search(r'^fmnist_feedback_accuracy\{name="fmnist",version="\w+"\} 1\.0$',
                         run.stdout, re.M), run.stdout
        assert run.stdout.split()[-2:] == ["2", "2"]  # feedback_images, feedback.images
        python = re.search(r"```python\n(.*?)```", text, re.S).group(1)  # type: ignore[union-attr]
        accuracy = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=120)
        assert accuracy.returncode == 0, accuracy.stderr[-3000:]
        assert "'labelled': 2, 'correct': 2, 'accuracy': 1.0}" in accuracy.stdout
    finally:
        assert worker.stop() == 0, worker.output()[-3000:]
        b = connect("kafka", config.load(env=topics.env(settings)))
        try:
            b.delete_topics([*topics.all(), topic])
        finally:
            b.close()
