"""Fault scenarios: real brokers, real `fmnist serve` processes, every request accounted for.

The tests beside this module (test_poison, test_crash, test_broker_faults, test_rebalance,
test_shutdown) run these scenarios and assert on what they report; ``scripts/faults`` runs
them all and prints the table in docs/reliability.md. Every wait is bounded, every address is
127.0.0.1, and each scenario owns its topics and group (and, for outages, its own Kafka).

Accounting: a request is *sent* once the broker confirmed its publish; *answered* once at least
one response with its request id arrived; every further response with that id is a
*duplicate*; a sent request never answered is *lost*.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmnist.brokers import Message, OutMessage, connect
from fmnist.client import decode_response
from fmnist.errors import BrokerError
from fmnist.serving import protocol
from tests.helpers import poll_until
from tests.integration.conftest import FMNIST, ROOT, Topics, WorkerProcess

LABELS: dict[str, dict[str, Any]] = json.loads((ROOT / "Images" / "labels.json").read_text())
IMAGES = {name: (ROOT / "Images" / name).read_bytes() for name in sorted(LABELS)}
# The workers load weights/<model.name>.keras, by default the trained `fmnist`. A development
# knob: FMNIST_FAULTS_MODEL=<name> runs them on other (throwaway) weights, whose labels are
# meaningless, so labels are then not checked.
MODEL = os.environ.get("FMNIST_FAULTS_MODEL", "")
WORKER_START_S = 90  # model load + broker connect, on a loaded 2-core machine


# -- poison -----------------------------------------------------------------------------------

def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header promising width x height grey pixels, with a tiny IDAT (as in
    tests/unit/test_imaging.py)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(IMAGES["coat4.png"])).convert("L").resize((112, 112)).save(
        buffer, "JPEG", quality=90)
    return buffer.getvalue()


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nnewpath 4 4 moveto 24 24 lineto "
       b"stroke\nshowpage\n%%EOF\n")
SVG = (b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" '
       b'width="28" height="28"><rect x="4" y="4" width="20" height="20" fill="#fff"/></svg>\n')
# The largest request a Kafka client with default limits (max.request.size = broker
# message.max.bytes = 1 MiB) can publish: its dead letter, the same bytes plus dlq_* headers,
# would be over the limit if the worker copied it whole.
KAFKA_NEAR_LIMIT_BYTES = 1_048_200
FIVE_MB = 5 * 1024 * 1024


@dataclass(frozen=True)
class Poison:
    """One hostile request: its payload, how its headers differ from a good request's, and the
    stable error code its answer must carry."""

    payload: bytes
    code: str
    headers: Callable[[str], dict[str, str]] = lambda rid: protocol.request_headers(
        rid, "application/octet-stream")
    malformed_id: bool = False  # sent with a request_id header that breaks the id rules


def poison_cases(broker_name: str) -> dict[str, Poison]:
    """Every case of docs/reliability.md, for one broker (only the big payload differs)."""
    png = IMAGES["boot9.png"]
    jpg = jpeg()
    big = FIVE_MB if broker_name == "pubsub" else KAFKA_NEAR_LIMIT_BYTES

    def with_headers(**extra: str) -> Callable[[str], dict[str, str]]:
        return lambda rid: {**protocol.request_headers(rid, "image/png"), **extra}

    return {
        "random_bytes": Poison(random.Random(7).randbytes(4096), "unsupported_format"),
        "empty": Poison(b"", "empty_payload"),
        "truncated_png": Poison(png[:len(png) // 2], "undecodable_image"),
        "truncated_jpeg": Poison(jpg[:len(jpg) // 2], "undecodable_image"),
        "eps": Poison(EPS, "unsupported_format"),
        "svg": Poison(SVG, "unsupported_format"),
        "png_30000x30000": Poison(png_bomb(), "image_too_large"),
        "big_payload": Poison(b"\x89PNG\r\n\x1a\n" + bytes(big - 8), "payload_too_large"),
        "300_headers": Poison(png, "invalid_headers", with_headers(
            **{f"x-h{i:03d}": "v" * 16 for i in range(300)})),
        "100kb_header": Poison(png, "invalid_headers", with_headers(**{"x-note": "n" * 100_000})),
        "malformed_request_id": Poison(png, "invalid_headers", with_headers(), malformed_id=True),
        # Names of the Python Pub/Sub client's publish() keywords: a worker that copies them into
        # a dead letter must still be able to publish it.
        "publish_keyword_headers": Poison(b"not an image", "unsupported_format", with_headers(
            topic="t", data="d", timeout="1", retry="r", ordering_key="k")),
    }


# -- accounting -------------------------------------------------------------------------------

@dataclass
class Report:
    scenario: str
    broker: str
    sent: int = 0
    answered: int = 0
    duplicates: int = 0
    lost: int = 0
    error_responses: int = 0
    dlq_records: int = 0
    wrong_labels: int = 0
    seconds: float = 0.0
    note: str = ""  # what else was measured, in words (scripts/faults prints it)
    facts: dict[str, Any] = field(default_factory=dict)  # what the tests assert on, besides
    failure: str = ""  # set by scripts/faults when the scenario itself broke

    COLUMNS = ("scenario", "broker", "sent", "answered", "duplicates", "lost", "error_responses",
               "dlq_records", "wrong_labels", "seconds", "note")

    def row(self) -> list[str]:
        return [f"{getattr(self, c):.0f}" if c == "seconds" else str(getattr(self, c))
                for c in self.COLUMNS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Run:
    """One scenario's world: private topics and group, a broker client, private readers of the
    response and dead-letter topics, the requests sent and the workers started.

    A context manager: leaving it kills every worker still running and closes the clients.
    """

    def __init__(self, broker_name: str, workdir: Path, bootstrap: str | None = None) -> None:
        self.broker_name = broker_name
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.topics = Topics(broker_name)
        self.env: dict[str, str] = {"FMNIST_MODEL__NAME": MODEL} if MODEL else {}
        sections: dict[str, dict[str, Any]] = {}
        if bootstrap:
            self.env["FMNIST_KAFKA__BOOTSTRAP_SERVERS"] = bootstrap
            sections["kafka"] = {"bootstrap_servers": bootstrap}
        self.cfg = self.topics.config(**sections)
        self.broker = connect(broker_name, self.cfg)
        self.workers: list[WorkerProcess] = []
        self.expected: dict[str, str | None] = {}  # request id -> sample image name, or None
        self.answers: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.letters: dict[str, list[Message]] = defaultdict(list)  # by dlq_request_id
        self.letters_by_sent_id: dict[str, list[Message]] = defaultdict(list)  # by request_id
        self._lock = threading.Lock()
        self._readers: list[Any] = []
        self.started = time.monotonic()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> Run:
        """Create the topics (and Pub/Sub subscriptions) and start reading answers and letters;
        requests published from now on are held for the workers even before one runs."""
        self.broker.check(timeout_s=10)
        self.broker.ensure_topics([self.topics.request, self.topics.response, self.topics.dlq])
        self.responses = self.broker.consumer(self.topics.response, group=None)
        self.dead = self.broker.consumer(self.topics.dlq, group=None)
        self._readers = [self.responses, self.dead]
        self.producer = self.broker.producer()
        return self

    def close(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait(timeout=30)
            worker.log.close()
        for reader in self._readers:
            try:
                reader.close()
            except Exception:  # noqa: BLE001 - a reader of a broker that is gone
                pass
        self.broker.close()

    # -- workers --

    def start_worker(self, *args: str, **env: str) -> WorkerProcess:
        worker = WorkerProcess(self.topics, self.workdir / f"worker-{len(self.workers)}.log",
                               *args, **{**self.env, **env})
        self.workers.append(worker)
        return worker

    # -- requests --

    def send(self, requests: list[tuple[str, bytes, dict[str, str], str | None]],
             timeout_s: float = 30) -> None:
        """Publish (request id, payload, headers, image name) and wait for the broker to confirm;
        only then do they count as sent."""
        self.producer.publish([OutMessage(self.topics.request, payload, key=rid, headers=headers)
                               for rid, payload, headers, _ in requests], timeout_s=timeout_s)
        with self._lock:
            self.expected.update({rid: name for rid, _, _, name in requests})

    def good(self, prefix: str, n: int, start: int = 0) -> list[tuple[str, bytes, dict[str, str],
                                                                      str | None]]:
        names = sorted(IMAGES)
        out = []
        for i in range(start, start + n):
            name = names[i % len(names)]
            rid = f"{prefix}-{i}"
            out.append((rid, IMAGES[name], protocol.request_headers(rid, "image/png"), name))
        return out

    def send_good(self, prefix: str, n: int) -> list[str]:
        batch = self.good(prefix, n)
        self.send(batch)
        return [rid for rid, *_ in batch]

    # -- answers --

    def pump(self, timeout_s: float = 0.2) -> int:
        """Read what has arrived on the response and dead-letter topics; returns how much."""
        try:
            return self._pump(timeout_s)
        except BrokerError:  # the broker is down (an outage scenario); read again later
            time.sleep(timeout_s)
            return 0

    def _pump(self, timeout_s: float) -> int:
        got = 0
        for message in self.responses.next_batch(1000, timeout_s=timeout_s):
            body = decode_response(message)
            self.answers[str(body.get("request_id"))].append(body)
            got += 1
        for message in self.dead.next_batch(1000, timeout_s=0):
            self.letters[message.headers.get("dlq_request_id", "")].append(message)
            if protocol.REQUEST_ID in message.headers:
                self.letters_by_sent_id[message.headers[protocol.REQUEST_ID]].append(message)
            got += 1
        return got

    def answer_id(self, rid: str) -> str:
        """The id a request was answered under: its own, or the one the worker derived when
        its request_id header was malformed (found through the dead letter, which keeps it)."""
        if rid in self.answers or rid not in self.letters_by_sent_id:
            return rid
        return self.letters_by_sent_id[rid][0].headers["dlq_request_id"]

    def unanswered(self, ids: list[str] | None = None) -> list[str]:
        with self._lock:
            wanted = list(self.expected) if ids is None else ids
        return [rid for rid in wanted if self.answer_id(rid) not in self.answers]

    def wait_answered(self, ids: list[str] | None = None, timeout: float = 60,
                      letters: list[str] = ()) -> None:
        """Pump until every id (default: every request sent) is answered and each of
        ``letters`` is dead-lettered; AssertionError naming what is missing after ``timeout``."""
        def done() -> bool:
            self.pump()
            return not self.unanswered(ids) and all(
                self.letters.get(self.answer_id(rid)) for rid in letters)

        try:
            poll_until(done, timeout, interval=0.01, message="every answer")
        except AssertionError:
            missing = self.unanswered(ids)
            raise AssertionError(
                f"{len(missing)} request(s) unanswered after {timeout} s (e.g. {missing[:5]}); "
                f"letters missing for {[r for r in letters if not self.letters.get(r)]}; worker "
                f"logs:\n{self.logs()}") from None

    def drain(self, quiet_s: float = 1.0, timeout: float = 10) -> None:
        """Keep reading until nothing arrived for ``quiet_s`` (late duplicates), bounded."""
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() - last < quiet_s and time.monotonic() < deadline:
            if self.pump(timeout_s=0.2):
                last = time.monotonic()

    def by_worker(self) -> Counter[str]:
        return Counter(a.get("worker_id", "?") for answers in self.answers.values()
                       for a in answers)

    def logs(self, tail: int = 40) -> str:
        return "\n".join(f"--- {w.log_path.name} (rc {w.proc.poll()})\n"
                         + "\n".join(w.output().splitlines()[-tail:]) for w in self.workers)

    def report(self, scenario: str, only: set[str] | None = None, since: float | None = None,
               note: str = "", **facts: Any) -> Report:
        """The accounting of every request sent (or of those in ``only``), timed from ``since``
        (a time.monotonic(); default: when the run began)."""
        with self._lock:
            expected = {rid: name for rid, name in self.expected.items()
                        if only is None or rid in only}
        answered = {rid: self.answers[self.answer_id(rid)] for rid in expected
                    if self.answer_id(rid) in self.answers}
        wrong = 0
        if not MODEL:
            wrong = sum(1 for rid, answers in answered.items() if expected[rid] is not None
                        and any(a.get("label") != LABELS[expected[rid]]["label"]
                                for a in answers))
        return Report(
            scenario=scenario, broker=self.broker_name, sent=len(expected),
            answered=len(answered), duplicates=sum(len(a) - 1 for a in answered.values()),
            lost=len(expected) - len(answered),
            error_responses=sum(1 for a in answered.values() if a[0].get("status") == "error"),
            dlq_records=sum(1 for rid in expected if self.letters.get(self.answer_id(rid))),
            wrong_labels=wrong, seconds=time.monotonic() - (since or self.started), note=note,
            facts=facts)


class Stream:
    """Publishes good requests in chunks at a steady rate, in a thread, until ``count`` or
    ``stop()``. A chunk the broker does not confirm (it is down) is published again, same ids,
    until it is; so every request of the stream is eventually sent."""

    def __init__(self, run: Run, prefix: str, count: int, per_s: float, chunk: int = 10) -> None:
        self.run, self.prefix, self.count, self.per_s, self.chunk = run, prefix, count, per_s, chunk
        self.sent = 0
        self.failed_publishes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._publish, name=f"stream-{prefix}",
                                        daemon=True)

    def start(self) -> Stream:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def finished(self) -> bool:
        return not self._thread.is_alive()

    def _publish(self) -> None:
        started = time.monotonic()
        while self.sent < self.count and not self._stop.is_set():
            batch = self.run.good(self.prefix, min(self.chunk, self.count - self.sent), self.sent)
            while not self._stop.is_set():
                try:
                    self.run.send(batch, timeout_s=10)
                    break
                except BrokerError:
                    self.failed_publishes += 1
                    self._stop.wait(0.5)
            else:
                return
            self.sent += len(batch)
            self._stop.wait(max(0.0, started + self.sent / self.per_s - time.monotonic()))


# -- a private Kafka --------------------------------------------------------------------------

class OwnKafka:
    """A single-node Kafka of our own (scripts/kafka.sh on free ports, its state in ``state``)
    that a scenario may stop and start; the shared one on 9092 is never touched."""

    def __init__(self, state: Path) -> None:
        self.port = free_port()
        self.controller_port = free_port()
        while self.controller_port == self.port:
            self.controller_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "KAFKA_PORT": str(self.port),
                    "KAFKA_CONTROLLER_PORT": str(self.controller_port), "FMNIST_STATE": str(state),
                    "KAFKA_HEAP_OPTS": "-Xms128m -Xmx512m", "KAFKA_READY_S": "90"}

    def _script(self, action: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(ROOT / "scripts" / "kafka.sh"), action], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def _timed(self, action: str, failure: str) -> float:
        """Run ``kafka.sh action``; seconds it took, or RuntimeError("own Kafka did not ...")."""
        started = time.monotonic()
        done = self._script(action)
        if done.returncode != 0:
            raise RuntimeError(f"own Kafka did not {failure}: {done.stdout}{done.stderr}")
        return time.monotonic() - started

    def up(self) -> float:
        return self._timed("up", "start")

    def down(self) -> float:
        return self._timed("down", "stop")

    def running(self) -> bool:
        return self._script("status", timeout=30).returncode == 0


# -- the scenarios ----------------------------------------------------------------------------

def poison_case(run: Run, name: str, case: Poison, around: int = 3
                ) -> tuple[str, dict[str, str], list[str]]:
    """Send ``around`` good requests, the poison, ``around`` more; wait for every answer and the
    poison's dead letter. Returns the poison's request id and headers, and the good ids."""
    tag = f"{name}-{time.monotonic_ns()}"
    rid = f"poison {tag}!" if case.malformed_id else f"poison-{tag}"
    headers = case.headers(rid)
    goods = run.good(f"good-{tag}", 2 * around)
    run.send([*goods[:around], (rid, case.payload, headers, None), *goods[around:]])
    good_ids = [g[0] for g in goods]
    run.wait_answered([*good_ids, rid], timeout=60, letters=[rid])
    return rid, headers, good_ids


def poison(broker_name: str, workdir: Path) -> Report:
    """Every poison case in one stream of good requests, against one worker."""
    with Run(broker_name, workdir) as run:
        run.open()
        run.start_worker()
        run.wait_answered(run.send_good("warm", 1), timeout=WORKER_START_S)
        for name, case in poison_cases(broker_name).items():
            poison_case(run, name, case)
        run.drain()
        return run.report("poison", note=f"{len(poison_cases(broker_name))} kinds, each between "
                                         "good requests; one worker throughout")


def crash(broker_name: str, workdir: Path, count: int = 1000, per_s: float = 1000) -> Report:
    """A stream of ``count`` requests; the worker is killed (SIGKILL) once a fifth is answered
    and a fresh one started at once. `fmnist listen` watches the answers throughout."""
    with Run(broker_name, workdir) as run:
        run.open()
        listener = subprocess.Popen(
            [*FMNIST, "listen", "--json", "--count", str(count), "--timeout", "240"], cwd=ROOT,
            env=run.topics.env(**run.env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        try:
            ready = listener.stderr.readline() if listener.stderr else ""
            assert "Listening on" in ready, ready
            first = run.start_worker()
            run.wait_answered(run.send_good("warm", 1), timeout=WORKER_START_S)
            stream = Stream(run, "crash", count - 1, per_s, chunk=50).start()
            poll_until(lambda: run.pump() >= 0 and len(run.answers) >= count // 5,
                       timeout=120, interval=0, message=f"{count // 5} answers")
            first.proc.kill()  # SIGKILL: no draining, no commit, no goodbye to the group
            first.proc.wait(timeout=30)
            killed = time.monotonic()
            run.pump(timeout_s=0)
            answered_at_kill = len(run.answers)
            run.start_worker()
            poll_until(stream.finished, timeout=120, message="the stream to be published")
            run.wait_answered(timeout=180)
            recovered_s = time.monotonic() - killed
            run.drain(quiet_s=2)
            out, err = listener.communicate(timeout=60)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.communicate()
        lines = [json.loads(line) for line in out.splitlines() if line.strip()]
        return run.report("kill -9 mid-stream", answered_at_kill=answered_at_kill,
                          note=f"killed after {answered_at_kill} answers; all answered "
                               f"{recovered_s:.0f} s after the kill",
                          recovered_s=round(recovered_s, 1),
                          listener_rc=listener.returncode,
                          listener_ids=[line["request_id"] for line in lines],
                          by_worker=run.by_worker(), listener_err=err[-2000:])


def _signal_after_log(worker: WorkerProcess, line: str, timeout: float = 30) -> None:
    poll_until(lambda: line in worker.output(), timeout, interval=0.005, message=repr(line))


def sigterm(broker_name: str, workdir: Path, count: int = 1000) -> tuple[Report, Report]:
    """Two shutdowns in the middle of a busy stream.

    1. SIGTERM: the worker finishes the batch in flight (answers and commits it) and exits 0; a
       new worker answers the rest, and none of what the first answered a second time.
    2. SIGTERM, then another once the first is being handled: exit 130 at once, no draining; a
       new worker answers what was left (at least once: the abandoned batch may be answered
       twice).
    """
    with Run(broker_name, workdir) as run:
        run.open()
        first = run.start_worker()
        run.wait_answered(run.send_good("warm", 1), timeout=WORKER_START_S)
        stream = Stream(run, "term", count - 1, per_s=1000, chunk=50).start()
        poll_until(lambda: run.pump() >= 0 and len(run.answers) >= count // 5, timeout=120,
                   interval=0, message=f"{count // 5} answers")
        first.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        first_rc = first.proc.wait(timeout=60)
        first_exit_s = time.monotonic() - signalled
        run.pump(timeout_s=0)
        answered_at_exit = len(run.answers)
        poll_until(stream.finished, timeout=120, message="the stream to be published")
        second = run.start_worker()
        run.wait_answered(timeout=180)
        run.drain(quiet_s=2)
        drained = run.report("SIGTERM: drain and exit 0", exit_code=first_rc,
                             note=f"exit {first_rc} {first_exit_s:.1f} s after SIGTERM, with "
                                  f"{answered_at_exit} answered",
                             exit_s=round(first_exit_s, 2), answered_at_exit=answered_at_exit,
                             by_worker=run.by_worker(), log=first.output())

        before = set(run.expected)
        phase = time.monotonic()
        stream = Stream(run, "hard", count, per_s=1000, chunk=50).start()
        poll_until(lambda: run.pump() >= 0 and len(run.answers) >= len(before) + count // 5,
                   timeout=120, interval=0, message=f"{count // 5} more answers")
        second.proc.send_signal(signal.SIGTERM)
        _signal_after_log(second, "SIGTERM received")
        second.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        second_rc = second.proc.wait(timeout=60)
        second_exit_s = time.monotonic() - signalled
        poll_until(stream.finished, timeout=120, message="the stream to be published")
        run.start_worker()
        run.wait_answered(timeout=180)
        run.drain(quiet_s=2)
        hard = run.report("second signal: exit 130", only=set(run.expected) - before,
                          since=phase, note=f"exit {second_rc} {second_exit_s:.2f} s after the "
                                            "second signal",
                          exit_code=second_rc, exit_s=round(second_exit_s, 2),
                          log=second.output())
        return drained, hard


def kafka_late(kafka: OwnKafka, workdir: Path, count: int = 200) -> Report:
    """The worker starts while Kafka is down: it retries with growing pauses and says so, then
    serves as soon as Kafka is up, without a restart."""
    if kafka.running():
        kafka.down()
    with Run("kafka", workdir, bootstrap=kafka.address) as run:
        worker = run.start_worker()
        poll_until(lambda: len(re.findall("retrying in", worker.output())) >= 3, timeout=120,
                   interval=0.1, message="three retries")
        up_s = kafka.up()
        run.open()
        run.send_good("late", count)
        run.wait_answered(timeout=120)
        run.drain()
        log = worker.output()
        waits = [float(w) for w in re.findall(r"retrying in ([0-9.]+) s", log)]
        return run.report("worker started before Kafka", kafka_up_s=round(up_s, 1), waits=waits,
                          running=worker.proc.poll() is None, log=log,
                          note=f"retried after {', '.join(f'{w:g}' for w in waits)} s; Kafka "
                               f"took {up_s:.0f} s to start")


def kafka_restart(kafka: OwnKafka, workdir: Path, count: int = 1000, per_s: float = 1000
                  ) -> Report:
    """Kafka stops (cleanly) and starts again while the worker works through a backlog of
    requests; the stream keeps publishing (retrying what the broker did not confirm). The worker
    recovers by itself and every request is answered."""
    if not kafka.running():
        kafka.up()
    with Run("kafka", workdir, bootstrap=kafka.address) as run:
        run.open()
        worker = run.start_worker()
        run.wait_answered(run.send_good("warm", 1), timeout=WORKER_START_S)
        stream = Stream(run, "outage", count - 1, per_s, chunk=50).start()
        poll_until(lambda: run.pump() >= 0 and len(run.answers) >= count // 4, timeout=120,
                   interval=0, message=f"{count // 4} answers")
        down_s = kafka.down()
        answered_at_stop = len(run.answers)
        up_s = kafka.up()
        restarted = time.monotonic()
        poll_until(stream.finished, timeout=180, message="the stream to be published")
        run.wait_answered(timeout=120)
        recovered_s = time.monotonic() - restarted
        run.drain(quiet_s=2)
        return run.report("Kafka stopped and restarted", kafka_down_s=round(down_s, 1),
                          note=f"stopped with {answered_at_stop} answered; {down_s:.0f} s to "
                               f"stop, {up_s:.0f} s to start; all answered {recovered_s:.0f} s "
                               f"after; same worker process",
                          kafka_up_s=round(up_s, 1), recovered_s=round(recovered_s, 1),
                          answered_at_stop=answered_at_stop,
                          failed_publishes=stream.failed_publishes,
                          running=worker.proc.poll() is None, log=worker.output())


def rebalance(workdir: Path, per_s: float = 60, limit: int = 5000) -> Report:
    """While requests flow: a second worker joins the group and answers a share, then leaves
    (SIGTERM); a third joins, answers a share, and is killed (SIGKILL: its partitions move back
    only after the session timeout). Requests flow a while longer to the first worker alone.
    Every request is answered and the group's committed offsets catch up with the end of
    every partition (lag 0: no partition stuck)."""
    with Run("kafka", workdir) as run:
        run.open()
        run.start_worker()
        run.wait_answered(run.send_good("warm", 1), timeout=WORKER_START_S)
        stream = Stream(run, "rebalance", limit, per_s).start()
        marks: dict[str, int] = {}
        rcs = []
        for name, leave in (("second", "SIGTERM"), ("third", "SIGKILL")):
            worker = run.start_worker()
            wid = f"{socket.gethostname()}-{worker.proc.pid}"
            poll_until(lambda: run.pump() >= 0 and run.by_worker()[wid] >= 60,  # noqa: B023
                       timeout=WORKER_START_S, interval=0, message=f"answers from the {name}")
            marks[f"{name}_joined_at"] = stream.sent
            if leave == "SIGTERM":
                rcs.append(worker.stop())
            else:
                worker.proc.kill()
                rcs.append(worker.proc.wait(timeout=30))
            marks[f"{name}_left_at"] = stream.sent
        # Requests keep flowing to the first worker alone again.
        poll_until(lambda: run.pump() >= 0 and stream.sent >= marks["third_left_at"] + 3 * per_s,
                   timeout=60, interval=0, message="more requests after the leaves")
        stream.stop()
        run.wait_answered(timeout=120)
        lags: list[dict[int, int]] = []

        def caught_up() -> bool:
            lags.append(run.broker.group_lag(run.topics.group, run.topics.request))
            return not any(lags[-1].values())

        poll_until(caught_up, timeout=60, interval=0.2, message="group lag 0")
        run.drain(quiet_s=2)
        shares = sorted(run.by_worker().values(), reverse=True)
        return run.report("workers join and leave (SIGTERM, SIGKILL)", **marks, exit_codes=rcs,
                          note=f"answers per worker {'/'.join(map(str, shares))}; committed "
                               f"lag 0 on all {len(lags[-1])} partitions",
                          by_worker=run.by_worker(), lag=lags[-1],
                          logs=[w.output() for w in run.workers])
