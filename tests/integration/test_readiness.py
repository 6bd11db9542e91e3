"""/readyz tells the truth: a serving worker turns unready while its broker is away and ready
again by itself once it is back, and what is sent once it says ready is answered. Each broker
here is one of the test's own (a Kafka on free ports, a second Pub/Sub emulator on a free port),
so stopping it disturbs no other test.

The figures (seconds to 503 after the stop, to 200 after the start) are printed; run with
``-s`` to see them: ``.venv/bin/python -m pytest -s tests/integration/test_readiness.py``.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fmnist.brokers import OutMessage, connect
from fmnist.client import decode_response
from fmnist.serving import protocol
from fmnist.testing.processes import WorkerProcess
from fmnist.testing.run import IMAGES, LABELS, WORKER_START_S, OwnKafka, OwnPubsub, free_port
from fmnist.testing.topics import Topics
from fmnist.testing.waiting import http_get, poll_until

pytestmark = pytest.mark.slow
OUTAGE_S = 10  # how long the broker stays away
UNREADY_WITHIN_S = 15  # bound on noticing it
READY_WITHIN_S = 90  # bound on being ready again after the broker's start returned


class Watched:
    """A worker with a health port, on private topics of a broker at ``sections``' address."""

    def __init__(self, broker: str, folder: Path, sections: dict[str, dict[str, str]],
                 env: dict[str, str]) -> None:
        self.broker, self.sections = broker, sections
        self.topics = Topics(broker)
        self.port = free_port()
        self.log = folder / f"worker-{broker}.log"
        self.process = WorkerProcess(self.topics, self.log, "--metrics-port", str(self.port),
                                     env={"FMNIST_SERVE__METRICS_HOST": "127.0.0.1", **env})

    def readyz(self) -> tuple[int, str]:
        return http_get(f"http://127.0.0.1:{self.port}/readyz", timeout=2)

    def healthz(self) -> int:
        return http_get(f"http://127.0.0.1:{self.port}/healthz", timeout=2)[0]

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def wait_readyz(self, code: int, timeout: float, starting: bool = False) -> float:
        """Seconds until /readyz answers ``code``; /healthz must stay 200 meanwhile (once the
        port is open: it opens when the model is loaded, while ``starting``)."""
        started = time.monotonic()

        def reached() -> bool:
            assert self.process.alive(), self.tail()
            assert self.healthz() == 200 or starting, self.tail()
            return self.readyz()[0] == code

        try:
            poll_until(reached, timeout, interval=0.1,
                       message=f"/readyz {code} from the {self.broker} worker")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; it answers {self.readyz()}\n{self.tail()}") from None
        return time.monotonic() - started

    def stay_unready(self, until: float) -> None:
        """Until time.monotonic() reaches ``until``: /readyz 503 and /healthz 200 throughout."""
        def checked() -> bool:
            code, text = self.readyz()
            assert code == 503 and text.startswith("not ready: "), (code, text, self.tail())
            assert self.healthz() == 200, self.tail()
            return time.monotonic() >= until

        poll_until(checked, until - time.monotonic() + 10, interval=0.5,
                   message="the outage to last")

    def exchange(self, count: int, timeout: float = 60) -> None:
        """Send ``count`` sample images now; every one must be answered, correctly."""
        cfg = self.topics.config(sections=self.sections)
        broker = connect(self.broker, cfg)
        reader = broker.consumer(self.topics.response, group=None)
        try:
            names = sorted(IMAGES)
            sent = {}
            out = []
            for i in range(count):
                rid, name = f"r-{uuid.uuid4().hex[:10]}", names[i % len(names)]
                sent[rid] = name
                out.append(OutMessage(self.topics.request, IMAGES[name], key=rid,
                                      headers=protocol.request_headers(rid, "image/png")))
            broker.producer().publish(out, timeout_s=30)
            answers: dict[str, object] = {}

            def all_answered() -> bool:
                for message in reader.next_batch(500, timeout_s=0.2):
                    body = decode_response(message)
                    answers.setdefault(str(body.get("request_id")), body.get("label"))
                return sent.keys() <= answers.keys()

            try:
                poll_until(all_answered, timeout, interval=0, message=f"{count} answers")
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {len(sent.keys() - answers.keys())} missing\n"
                                     f"{self.tail()}") from None
            assert all(answers[rid] == LABELS[name]["label"] for rid, name in sent.items())
        finally:
            reader.close()
            broker.close()


def outage(worker: Watched, stop: object, start: object) -> dict[str, float]:
    """Serve, stop the broker under the idle worker for ``OUTAGE_S``, start it again; the
    seconds each change of /readyz took."""
    worker.wait_readyz(200, WORKER_START_S, starting=True)
    # serve.metrics_host=127.0.0.1 reached the socket: another loopback address is refused
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", worker.port), timeout=2).close()
    worker.exchange(20)
    stopping = time.monotonic()
    stop()  # type: ignore[operator]
    stopped = time.monotonic()
    unready_s = worker.wait_readyz(503, UNREADY_WITHIN_S)
    worker.stay_unready(stopped + OUTAGE_S)
    starting = time.monotonic()
    start()  # type: ignore[operator]
    started = time.monotonic()
    ready_s = worker.wait_readyz(200, READY_WITHIN_S)
    worker.exchange(20)  # ready means answered: nothing sent now is lost
    assert worker.process.stop() == 0, worker.tail()
    figures = {"stop_s": round(stopped - stopping, 1),
               "unready_after_stop_s": round(unready_s, 1),
               "start_s": round(started - starting, 1),
               "ready_after_start_s": round(ready_s, 1)}
    print(f"\n{worker.broker}: {figures}")
    return figures


@pytest.fixture
def own_kafka(tmp_path: Path) -> Iterator[OwnKafka]:
    kafka = OwnKafka(tmp_path / "own-kafka")
    kafka.up()
    yield kafka
    kafka.down()


@pytest.fixture
def own_emulator(tmp_path: Path) -> Iterator[OwnPubsub]:
    emulator = OwnPubsub(tmp_path / "own-pubsub")
    emulator.up()
    yield emulator
    emulator.down()


@pytest.mark.kafka
def test_kafka_stopped_under_a_worker_turns_it_unready_then_ready(own_kafka: OwnKafka,
                                                                  tmp_path: Path) -> None:
    worker = Watched("kafka", tmp_path, {"kafka": {"bootstrap_servers": own_kafka.address}},
                     {"FMNIST_KAFKA__BOOTSTRAP_SERVERS": own_kafka.address})
    try:
        outage(worker, own_kafka.down, own_kafka.up)
    finally:
        worker.process.kill()


@pytest.mark.pubsub
def test_pubsub_emulator_stopped_under_a_worker_turns_it_unready_then_ready(
        own_emulator: OwnPubsub, tmp_path: Path) -> None:
    worker = Watched("pubsub", tmp_path, {"pubsub": {"emulator_host": own_emulator.address}},
                     {"FMNIST_PUBSUB__EMULATOR_HOST": own_emulator.address})
    try:
        outage(worker, own_emulator.down, own_emulator.up)
    finally:
        worker.process.kill()
