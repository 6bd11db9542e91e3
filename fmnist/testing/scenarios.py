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
import time
from pathlib import Path
from typing import Any

from fmnist.brokers.kafka import KafkaBroker
from fmnist.testing.poison import FIVE_MB, Poison, poison_cases
from fmnist.testing.processes import FMNIST, ROOT, WorkerProcess
from fmnist.testing.run import LABELS, MODEL, WORKER_START_S, OwnKafka, Report, Run, Stream
from fmnist.testing.waiting import poll_until

__all__ = ["FIVE_MB", "LABELS", "MODEL", "WORKER_START_S", "OwnKafka", "Poison", "Report", "Run",
           "crash", "kafka_late", "kafka_restart", "poison", "poison_case", "poison_cases",
           "rebalance", "sigterm"]

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
