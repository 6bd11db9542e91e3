"""One fault scenario's world (``Run``): private topics, real `fmnist serve` processes, a steady
stream of requests, a Kafka of its own, and the accounting of every request.

Accounting: a request is *sent* once the broker confirmed its publish; *answered* once at least
one response with its request id arrived; every further response with that id is a
*duplicate*; a sent request never answered is *lost*.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmnist.brokers import Message, OutMessage, connect
from fmnist.client import decode_response
from fmnist.errors import BrokerError
from fmnist.serving import protocol
from fmnist.testing.processes import ROOT, WorkerProcess
from fmnist.testing.topics import Topics
from fmnist.testing.waiting import poll_until

LABELS: dict[str, dict[str, Any]] = json.loads((ROOT / "Images" / "labels.json").read_text())
IMAGES = {name: (ROOT / "Images" / name).read_bytes() for name in sorted(LABELS)}
# The workers load weights/<model.name>.keras, by default the trained `fmnist`. A development
# knob: FMNIST_FAULTS_MODEL=<name> runs them on other (throwaway) weights, whose labels are
# meaningless, so labels are then not checked.
MODEL = os.environ.get("FMNIST_FAULTS_MODEL", "")
WORKER_START_S = 90  # model load + broker connect, on a loaded 2-core machine

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
        self.cfg = self.topics.config(sections=sections)
        self.broker = connect(broker_name, self.cfg)
        self.workers: list[WorkerProcess] = []
        self.expected: dict[str, str | None] = {}  # request id -> sample image name, or None
        self.sent_at_ms: dict[str, int] = {}  # request id -> its sent_at header
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
            worker.kill()
        for reader in self._readers:
            try:
                reader.close()
            except Exception:  # noqa: BLE001 - a reader of a broker that is gone
                pass
        self.broker.close()

    # -- workers --

    def start_worker(self, *args: str, **env: str) -> WorkerProcess:
        worker = WorkerProcess(self.topics, self.workdir / f"worker-{len(self.workers)}.log",
                               *args, env={**self.env, **env})
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
            self.sent_at_ms.update({rid: int(headers[protocol.SENT_AT])
                                    for rid, _, headers, _ in requests
                                    if headers.get(protocol.SENT_AT, "").isdigit()})

    def send_until_confirmed(self, requests: list[tuple[str, bytes, dict[str, str], str | None]],
                             stop: threading.Event) -> int | None:
        """``send`` again, the same ids, until the broker confirms (it may be down): how many
        attempts failed, or None when ``stop`` was set first."""
        failed = 0
        while not stop.is_set():
            try:
                self.send(requests, timeout_s=10)
                return failed
            except BrokerError:
                failed += 1
                stop.wait(0.5)
        return None

    def good(self, prefix: str, n: int, start: int = 0) -> list[tuple[str, bytes, dict[str, str],
                                                                      str | None]]:
        names = sorted(IMAGES)
        out: list[tuple[str, bytes, dict[str, str], str | None]] = []
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
                      letters: Sequence[str] = ()) -> None:
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
            for rid, answers in answered.items():
                name = expected[rid]
                if name is not None and any(a.get("label") != LABELS[name]["label"]
                                            for a in answers):
                    wrong += 1
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
            failed = self.run.send_until_confirmed(batch, self._stop)
            if failed is None:
                return
            self.failed_publishes += failed
            self.sent += len(batch)
            self._stop.wait(max(0.0, started + self.sent / self.per_s - time.monotonic()))


# -- a private broker --------------------------------------------------------------------------

class OwnService:
    """A broker of our own, run by ``scripts/<script>`` with the environment ``env`` (free ports,
    its state in a folder of its own) that a scenario may stop and start; the shared brokers
    are never touched."""

    script = ""
    title = ""  # for errors: "own <title> did not start"
    env: dict[str, str]

    def _script(self, action: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(ROOT / "scripts" / self.script), action], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def _timed(self, action: str, failure: str) -> float:
        """Run the script's ``action``; seconds it took, or RuntimeError("own ... did not ...")."""
        started = time.monotonic()
        done = self._script(action)
        if done.returncode != 0:
            raise RuntimeError(f"own {self.title} did not {failure}: {done.stdout}{done.stderr}")
        return time.monotonic() - started

    def up(self) -> float:
        return self._timed("up", "start")

    def down(self) -> float:
        return self._timed("down", "stop")

    def running(self) -> bool:
        return self._script("status", timeout=30).returncode == 0


class OwnKafka(OwnService):
    """A single-node Kafka of our own (scripts/kafka.sh); the shared one on 9092 is never
    touched. ``host`` is the address it listens on and names to clients (this machine's own
    address, for clients in containers).

    ``security="sasl_ssl"``: the authenticated, authorised broker (KAFKA_SECURITY=sasl_ssl),
    whose users log in with ``login(user)``'s settings."""

    script, title = "kafka.sh", "Kafka"

    def __init__(self, state: Path, host: str = "127.0.0.1", security: str = "plaintext"
                 ) -> None:
        self.port = free_port()
        self.controller_port = free_port()
        while self.controller_port == self.port:
            self.controller_port = free_port()
        self.address = f"{host}:{self.port}"
        self.security = security
        self.env = {**os.environ, "KAFKA_HOST": host, "KAFKA_PORT": str(self.port),
                    "KAFKA_CONTROLLER_PORT": str(self.controller_port), "FMNIST_STATE": str(state),
                    "KAFKA_HEAP_OPTS": "-Xms128m -Xmx512m", "KAFKA_READY_S": "90",
                    "KAFKA_SECURITY": security}
        self.state = state / ("kafka-sasl_ssl" if security == "sasl_ssl" else "kafka")
        self.cafile = self.state / "certs" / "ca.pem"

    def password_file(self, user: str) -> Path:
        """Where the sasl_ssl broker keeps ``user``'s password (admin, fmnist-worker,
        fmnist-client)."""
        return self.state / "secrets" / f"{user}.password"

    def login(self, user: str, password_file: bool = True) -> dict[str, str]:
        """The ``FMNIST_*`` variables of a process that logs in to the sasl_ssl broker as
        ``user``: its password from its file (or, ``password_file=False``, no password), the
        broker's CA, and no topic creation (only admin may create)."""
        env = {"FMNIST_KAFKA__BOOTSTRAP_SERVERS": self.address,
               "FMNIST_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
               "FMNIST_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
               "FMNIST_KAFKA__SASL_USERNAME": user, "FMNIST_KAFKA__SSL_CAFILE": str(self.cafile),
               "FMNIST_BROKER__CREATE_TOPICS": "false"}
        if password_file:
            env["FMNIST_KAFKA__SASL_PASSWORD_FILE"] = str(self.password_file(user))
        return env


class OwnPubsub(OwnService):
    """A Pub/Sub emulator of our own (scripts/pubsub.sh); the shared one on 8085 is never
    touched. The emulator keeps everything in memory: ``down`` forgets every topic,
    subscription and message."""

    script, title = "pubsub.sh", "emulator"

    def __init__(self, state: Path) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.env = {**os.environ, "FMNIST_STATE": str(state), "PUBSUB_HOST_PORT": self.address,
                    "PUBSUB_READY_S": "90"}
