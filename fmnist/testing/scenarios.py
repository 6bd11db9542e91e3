"""Fault scenarios: real brokers, real `fmnist serve` processes, every request accounted for.

The tests in tests/integration (test_poison, test_crash, test_broker_faults, test_rebalance,
test_shutdown) run these scenarios and assert on what they report; ``scripts/faults`` runs
them all and prints the table in docs/reliability.md. Every wait is bounded, every address is
127.0.0.1, and each scenario owns its topics and group (and, for outages, its own Kafka).

Accounting and the world each scenario runs in: ``fmnist.testing.run``.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fmnist.brokers import Broker, Consumer, Message, connect
from fmnist.brokers.kafka import KafkaBroker
from fmnist.errors import BrokerError
from fmnist.testing.poison import FIVE_MB, Poison, poison_cases
from fmnist.testing.processes import FMNIST, ROOT, WorkerProcess
from fmnist.testing.run import (
    LABELS,
    MODEL,
    WORKER_START_S,
    OwnKafka,
    OwnPubsub,
    Report,
    Run,
    Stream,
    free_port,
)
from fmnist.testing.waiting import http_get, poll_until

__all__ = ["FIVE_MB", "LABELS", "MODEL", "WORKER_START_S", "OwnKafka", "OwnPubsub", "Poison",
           "Report", "Run", "crash", "kafka_late", "kafka_restart", "poison", "poison_case",
           "poison_cases", "pubsub_restart", "rebalance", "sigterm"]

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
            env=run.topics.env(run.env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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


# The serving loop's retries; the crash-report thread logs its own, at a fixed pause.
_LOOP_RETRY = re.compile(r"broker problem: .*?; retrying in ([0-9.]+) s")


def kafka_late(kafka: OwnKafka, workdir: Path, count: int = 200) -> Report:
    """The worker starts while Kafka is down: it retries with growing pauses and says so, then
    serves as soon as Kafka is up, without a restart."""
    if kafka.running():
        kafka.down()
    with Run("kafka", workdir, bootstrap=kafka.address) as run:
        worker = run.start_worker()
        poll_until(lambda: len(_LOOP_RETRY.findall(worker.output())) >= 3, timeout=120,
                   interval=0.1, message="three retries")
        up_s = kafka.up()
        run.open()
        run.send_good("late", count)
        run.wait_answered(timeout=120)
        run.drain()
        log = worker.output()
        waits = [float(w) for w in _LOOP_RETRY.findall(log)]
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
            # Marked when it starts: a SIGTERM drain can end within one chunk of the stream,
            # so a mark taken after its answers could equal the one taken at its leave.
            marks[f"{name}_joined_at"] = stream.sent
            worker = run.start_worker()
            wid = f"{socket.gethostname()}-{worker.proc.pid}"
            poll_until(lambda: run.pump() >= 0 and run.by_worker()[wid] >= 60,  # noqa: B023
                       timeout=WORKER_START_S, interval=0, message=f"answers from the {name}")
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
        kafka = run.broker
        assert isinstance(kafka, KafkaBroker)  # the group's committed lag, as Kafka knows it

        def caught_up() -> bool:
            lags.append(kafka.group_lag(run.topics.group, run.topics.request))
            return not any(lags[-1].values())

        poll_until(caught_up, timeout=60, interval=0.2, message="group lag 0")
        run.drain(quiet_s=2)
        shares = sorted(run.by_worker().values(), reverse=True)
        facts: dict[str, Any] = {**marks, "exit_codes": rcs}
        return run.report("workers join and leave (SIGTERM, SIGKILL)", **facts,
                          note=f"answers per worker {'/'.join(map(str, shares))}; committed "
                               f"lag 0 on all {len(lags[-1])} partitions",
                          by_worker=run.by_worker(), lag=lags[-1],
                          logs=[w.output() for w in run.workers])


# -- the Pub/Sub emulator stopped and started under a worker ----------------------------------

class _AckingReader:
    """Reads a shared subscription, acknowledging what it hands out (each answer is read once),
    and notes when the first message arrived."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.first_at: float | None = None

    def next_batch(self, max_messages: int, timeout_s: float) -> list[Message]:
        batch = self.consumer.next_batch(max_messages, timeout_s)
        if batch:
            self.first_at = self.first_at or time.monotonic()
            self.consumer.commit(batch)
        return batch

    def commit(self, messages: list[Message]) -> None:
        """Nothing to do: acknowledged when handed out."""

    def redeliver(self, messages: list[Message]) -> None:
        self.consumer.redeliver(messages)

    def close(self) -> None:
        self.consumer.close()


class _EmulatorRun(Run):
    """A run on an emulator of its own, noting when each request's (successful) publish began:
    one begun once the worker says ready again must be answered."""

    def __init__(self, emulator_host: str, workdir: Path) -> None:
        super().__init__("pubsub", workdir)
        self.broker.close()  # made for the shared emulator; it opened nothing
        self.env["FMNIST_PUBSUB__EMULATOR_HOST"] = emulator_host
        self.cfg = self.topics.config(sections={"pubsub": {"emulator_host": emulator_host}})
        self.broker = connect("pubsub", self.cfg)
        self.began: dict[str, float] = {}
        self._brokers: list[Broker] = []

    def close(self) -> None:
        super().close()
        for broker in self._brokers:
            broker.close()

    def send(self, requests: list[tuple[str, bytes, dict[str, str], str | None]],
             timeout_s: float = 30) -> None:
        began = time.monotonic()
        super().send(requests, timeout_s)
        with self._lock:
            self.began.update({rid: began for rid, *_ in requests})

    def read_again(self) -> bool:
        """After the emulator's restart the private readers' subscriptions are gone: read the
        answers and dead letters from the topics' shared subscriptions, which the worker makes
        again with the topics (they hold what was published since). False until it has."""
        # A client of its own: the old readers' streams sleep through the client library's
        # reopen throttle inside their channel's event thread, holding up every stream on it.
        broker = connect("pubsub", self.cfg)
        try:
            readers = [_AckingReader(broker.retained_reader(topic))
                       for topic in (self.topics.response, self.topics.dlq)]
        except BrokerError:
            broker.close()
            return False
        self._brokers.append(broker)
        old, self._readers = self._readers, readers
        self.responses, self.dead = readers
        # Closed aside: closing a stream the emulator forgot can take its whole close timeout,
        # and answers are read meanwhile.
        threading.Thread(target=_close_quietly, args=old, daemon=True).start()
        return True


def _close_quietly(*readers: Consumer) -> None:
    for reader in readers:
        try:
            reader.close()
        except Exception:  # noqa: BLE001 - a reader of an emulator that forgot it
            pass


class _Probe:
    """Samples a worker's /healthz, /readyz and /status every ``every_s`` in a thread:
    (time.monotonic(), /healthz code, /readyz code, /readyz text), and (time.monotonic(),
    answers confirmed)."""

    def __init__(self, port: int, every_s: float = 0.2) -> None:
        self.url, self.every_s = f"http://127.0.0.1:{port}", every_s
        self.samples: list[tuple[float, int, int, str]] = []
        self.processed: list[tuple[float, int]] = []  # /status: answers confirmed so far
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="probe", daemon=True)

    def start(self) -> _Probe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _sample(self) -> None:
        while not self._stop.is_set():
            health = http_get(f"{self.url}/healthz", timeout=2)[0]
            ready, text = http_get(f"{self.url}/readyz", timeout=2)
            code, status = http_get(f"{self.url}/status", timeout=2)
            if code == 200:
                self.processed.append((time.monotonic(), json.loads(status)["processed"]))
            self.samples.append((time.monotonic(), health, ready, text.strip()))
            self._stop.wait(self.every_s)

    def first(self, ready: int, after: float) -> float | None:
        """When /readyz first answered ``ready`` after ``after`` (a time.monotonic())."""
        return next((t for t, _, code, _ in list(self.samples) if t > after and code == ready),
                    None)

    def answering(self, after: float) -> float | None:
        """When the worker had first confirmed more answers than it had at ``after``."""
        processed = list(self.processed)
        then = max((n for t, n in processed if t <= after), default=0)
        return next((t for t, n in processed if t > after and n > then), None)


def pubsub_restart(emulator: OwnPubsub, workdir: Path, per_s: float = 100, outage_s: float = 8,
                   after_s: float = 10) -> Report:
    """The emulator stops for ``outage_s`` and starts again while a worker serves a steady
    stream of ``per_s`` requests a second, which keeps publishing (retrying what the emulator
    did not confirm) until ``after_s`` after the worker is ready again.

    The emulator keeps everything in memory: its restart forgets the topics, subscriptions and
    every message not yet read, requests and answers alike. The report counts the requests
    whose publish began once /readyz said 200 again: each must be answered. The facts count the
    rest: sent before the stop (answered, or forgotten by the emulator), and confirmed after
    the restart but begun before the worker was ready (answered, or dropped by an emulator that
    had the request topic again but not yet its subscription)."""
    if not emulator.running():
        emulator.up()
    run = _EmulatorRun(emulator.address, workdir)
    with run:
        run.open()
        port = free_port()
        worker = run.start_worker("--metrics-port", str(port),
                                  FMNIST_SERVE__METRICS_HOST="127.0.0.1")
        run.wait_answered(run.send_good("warm", 1), timeout=WORKER_START_S)
        probe = _Probe(port).start()
        try:
            return _pubsub_outage(emulator, run, worker, probe, port, per_s, outage_s, after_s)
        finally:
            probe.stop()


def _pump_until(run: Run, condition: Callable[[], object], timeout: float, what: str) -> None:
    poll_until(lambda: run.pump() >= 0 and condition(), timeout, interval=0, message=what)


def _pubsub_outage(emulator: OwnPubsub, run: _EmulatorRun, worker: WorkerProcess, probe: _Probe,
                   port: int, per_s: float, outage_s: float, after_s: float) -> Report:
    stream = Stream(run, "outage", 1_000_000, per_s).start()
    _pump_until(run, lambda: len(run.answers) >= 3 * per_s, 120, f"{3 * per_s:g} answers")
    # Every answer the worker had confirmed (its /status `processed`) reaches the client: it
    # acknowledges a request only after that, so none it acknowledged goes unanswered.
    confirmed = json.loads(http_get(f"http://127.0.0.1:{port}/status")[1])["processed"]
    mark = time.monotonic()
    _pump_until(run, lambda: time.monotonic() >= mark + 2, 10, "2 s of answers")
    received = sum(len(a) for a in run.answers.values())

    stopping = time.monotonic()
    down_s = emulator.down()
    stopped = time.monotonic()
    while run.pump(timeout_s=0.1):  # what the reader's client had already taken in
        pass
    with run._lock:
        before = set(run.expected)
    answered_before = len(before) - len(run.unanswered(list(before)))
    # A client that publishes now is told: `fmnist send` fails (exit 4), the stream retries.
    send = subprocess.run(
        [*FMNIST, "send", "bag8.png"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=run.topics.env({**run.env, "FMNIST_FEEDBACK__SENT_DIR": str(run.workdir / "sent")}))
    poll_until(lambda: time.monotonic() >= stopped + outage_s, outage_s + 120, interval=0.1,
               message="the outage to last")
    with run._lock:
        during = set(run.expected) - before
    failed_publishes = stream.failed_publishes
    starting = time.monotonic()
    up_s = emulator.up()
    up = time.monotonic()

    _pump_until(run, run.read_again, 120, "the worker to create the response topic again")
    _pump_until(run, lambda: probe.first(200, up) is not None, 120, "/readyz 200 again")
    ready_at = probe.first(200, up) or up
    _pump_until(run, lambda: time.monotonic() >= ready_at + after_s, after_s + 60,
                f"{after_s:g} s of requests after the worker is ready")
    stream.stop()
    with run._lock:
        after = {rid for rid, began in run.began.items() if began > ready_at}
        between = set(run.expected) - before - during - after
    run.wait_answered(list(after), timeout=120)
    run.drain(quiet_s=2)
    reader = run.responses
    first_at = reader.first_at if isinstance(reader, _AckingReader) else None
    with run._lock:
        first_sent = min((run.began[rid] for rid in set(run.expected) - before), default=None)
    unready_at = probe.first(503, stopping)
    answering = probe.answering(up)
    health = [code for t, code, _, _ in probe.samples if t >= stopping]
    forgotten = len(run.unanswered(list(before)))
    dropped = len(run.unanswered(list(between)))
    return run.report(
        "Pub/Sub emulator stopped and restarted", only=after, since=stopping,
        note=f"{len(before)} sent before the stop, {forgotten} forgotten with the emulator; "
             f"{stream.failed_publishes} publishes retried; first answer "
             f"{(first_at or up) - up:.1f} s and /readyz 200 {ready_at - up:.1f} s after the "
             f"emulator was back; {len(between)} sent before that, {dropped} dropped; "
             "same worker process",
        confirmed_before=confirmed, received_before=received, sent_before=len(before),
        answered_before=answered_before, forgotten=forgotten, sent_during=len(during),
        failed_publishes=failed_publishes, publishes_retried=stream.failed_publishes,
        sent_between=len(between), dropped_between=dropped, send_rc=send.returncode,
        send_err=send.stderr[-2000:], down_s=round(down_s, 1), up_s=round(up_s, 1),
        outage_s=round(up - stopped, 1), start_s=round(up - starting, 1),
        unready_after_stop_s=None if unready_at is None else round(unready_at - stopping, 1),
        first_answer_s=None if first_at is None else round(first_at - up, 1),
        first_sent_s=None if first_sent is None else round(first_sent - up, 1),
        worker_answer_s=None if answering is None else round(answering - up, 1),
        ready_s=round(ready_at - up, 1), healthz=sorted(set(health)),
        readyz_texts=sorted({text for t, _, code, text in probe.samples
                             if code == 503 and t >= stopping}),
        running=worker.proc.poll() is None, by_worker=run.by_worker(), log=worker.output())
