"""What a rolling restart of Kafka workers under steady load costs: latency, the longest pause
in answers, lost and duplicate answers.

    .venv/bin/python benchmarks/rolling_restart.py [--modes dynamic static] [--ways sigterm kill]
                                [--workers 2] [--rate 150] [--rounds 3] [--out FILE.json]

Each round (``round_``) runs on its own topics and group (``fmnist.testing.run.Run``):
``--workers`` `fmnist serve` processes, each with /readyz on a port of its own; requests flow
at ``--rate`` (``Stream``); after ``BASELINE_S`` the workers are restarted one after the other,
as a rolling update does it: stop one (``sigterm``: drain and exit; ``kill``: SIGKILL, as when
a process dies), wait for it to exit, start its replacement, wait until its /readyz says
ready, then the next. Requests flow ``AFTER_S`` longer, then every answer is collected.

``--modes``: ``dynamic`` (no ``kafka.instance_id``) or ``static`` (``worker-0``, ``worker-1``,
...; each replacement with the id of the worker it replaces).

A request's latency is from its ``sent_at`` to the moment its worker finished it (the answer's
``timings_ms.total``; the client's read of the answer adds a few ms). Figures per round:
p50/p99/max of the requests sent during the restarts (first signal to ``SETTLE_S`` after the
last replacement is ready) and of those sent before (the baseline), and the longest time in
which no request at all was answered. Prints medians over the rounds and writes every round
to ``--out``; exits 1 if any request was lost or answered with an error.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fmnist.testing.processes import WorkerProcess
from fmnist.testing.run import WORKER_START_S, Run, Stream, free_port
from fmnist.testing.waiting import http_get, poll_until

BASELINE_S = 8.0  # steady load before the first restart
SETTLE_S = 5.0  # counted in the restart window after the last replacement is ready
AFTER_S = 5.0  # more load after that, so late answers of the window are not cut short
PREFIX = "rr"


class Slot:
    """One of the two workers' places: its /readyz port, its instance id (static mode), and
    the processes that held it."""

    def __init__(self, run: Run, index: int, static: bool) -> None:
        self.run, self.index, self.port = run, index, free_port()
        self.instance_id = f"worker-{index}" if static else ""
        self.processes: list[WorkerProcess] = []

    def start(self) -> WorkerProcess:
        env = {"FMNIST_SERVE__METRICS_PORT": str(self.port),
               "FMNIST_SERVE__METRICS_HOST": "127.0.0.1"}
        if self.instance_id:
            env["FMNIST_KAFKA__INSTANCE_ID"] = self.instance_id
        self.processes.append(self.run.start_worker(**env))
        return self.processes[-1]

    @property
    def current(self) -> WorkerProcess:
        return self.processes[-1]

    def ready(self) -> bool:
        self.run.pump(timeout_s=0)
        if not self.current.alive():
            raise AssertionError(f"worker {self.index} exited {self.current.proc.returncode}:\n"
                                 f"{self.current.output()[-3000:]}")
        return http_get(f"http://127.0.0.1:{self.port}/readyz", timeout=2)[0] == 200


def _warm(run: Run, workers: int) -> bool:
    """Send a few requests and wait for their answers; True once every worker answered some
    (each has partitions)."""
    run.wait_answered(run.send_good(f"warm{time.monotonic_ns()}", 8), timeout=30)
    return len(run.by_worker()) >= workers


def _pause(run: Run, seconds: float) -> None:
    """Keep reading answers for ``seconds``."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        run.pump(timeout_s=min(0.2, max(0.0, until - time.monotonic())))


def round_(mode: str, way: str, rate: float, workdir: Path, workers: int = 2
           ) -> dict[str, Any]:
    """One rolling restart; returns its figures and facts (see the module's docstring)."""
    with Run("kafka", workdir) as run:
        run.open()
        slots = [Slot(run, i, static=mode == "static") for i in range(workers)]
        for slot in slots:
            slot.start()
        for slot in slots:
            poll_until(slot.ready, WORKER_START_S, interval=0.1, message="a worker ready")
        poll_until(lambda: _warm(run, workers), 60, interval=0, message="answers from each worker")
        # about 30 publishes a second, each confirmed before the next (as fmnist send does)
        stream = Stream(run, PREFIX, count=10**7, per_s=rate, chunk=max(5, int(rate / 30))).start()
        _pause(run, BASELINE_S)
        began, began_mono = time.time(), time.monotonic()
        steps: list[dict[str, Any]] = []
        for slot in slots:
            old = slot.current
            signalled = time.monotonic()
            if way == "sigterm":
                old.proc.send_signal(signal.SIGTERM)
            else:
                old.proc.kill()
            poll_until(lambda old=old: run.pump(timeout_s=0) >= 0 and not old.alive(), 60,
                       interval=0.01, message="the old worker to exit")
            exited = time.monotonic()
            slot.start()
            poll_until(slot.ready, WORKER_START_S, interval=0.05, message="the replacement ready")
            steps.append({"slot": slot.index, "exit_code": old.proc.returncode,
                          "exit_s": round(exited - signalled, 2),
                          "ready_s": round(time.monotonic() - exited, 2),
                          "signalled_at_s": round(signalled - began_mono, 2),
                          "ready_at_s": round(time.monotonic() - began_mono, 2)})
        _pause(run, SETTLE_S)
        ended = time.time()
        _pause(run, AFTER_S)
        stream.stop()
        run.wait_answered(timeout=120)
        run.drain(quiet_s=2)
        return _figures(run, mode, way, rate, began * 1000, ended * 1000, steps, slots)


def _figures(run: Run, mode: str, way: str, rate: float, began_ms: float, ended_ms: float,
             steps: list[dict[str, Any]], slots: list[Slot]) -> dict[str, Any]:
    ids = {rid for rid in run.expected if rid.startswith(f"{PREFIX}-")}
    report = run.report("rolling restart", only=ids)
    sent = {rid: run.sent_at_ms[rid] for rid in ids}
    done = {rid: sent[rid] + run.answers[rid][0]["timings_ms"]["total"]
            for rid in ids if rid in run.answers}

    def latencies(lo: float, hi: float) -> dict[str, float | None]:
        ms = [done[r] - sent[r] for r in done if lo <= sent[r] < hi]
        if not ms:
            return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
        return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1),
                "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(max(ms), 1)}

    answered = sorted(t for t in done.values() if began_ms <= t <= ended_ms)
    gaps = [(b - a, a) for a, b in zip(answered, answered[1:], strict=False)]
    gap, gap_from = max(gaps, default=(None, None))
    logs = [p.output() for slot in slots for p in slot.processes]
    return {"mode": mode, "way": way, "workers": len(slots), "req_per_s": rate,
            "sent": report.sent,
            "lost": report.lost, "duplicates": report.duplicates,
            "error_responses": report.error_responses,
            "restart": latencies(began_ms, ended_ms), "baseline": latencies(0, began_ms),
            "longest_gap_ms": None if gap is None else round(gap, 1),
            "longest_gap_at_s": None if gap_from is None else round((gap_from - began_ms) / 1000, 2),
            "window_s": round((ended_ms - began_ms) / 1000, 1), "steps": steps,
            "revocations": sum(log.count("partitions revoked") for log in logs),
            "lost_partitions": sum(log.count("partitions lost") for log in logs),
            "refused_commits": sum(log.count("commit refused") for log in logs),
            "by_worker": dict(run.by_worker())}


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of one mode and way; counts summed."""
    def med(get: Any) -> float | None:
        values = [v for r in rounds if (v := get(r)) is not None]
        return round(statistics.median(values), 1) if values else None

    return {"mode": rounds[0]["mode"], "way": rounds[0]["way"],
            "workers": rounds[0]["workers"], "rounds": len(rounds),
            "req_per_s": rounds[0]["req_per_s"],
            **{f"restart_{k}": med(lambda r, k=k: r["restart"][k])
               for k in ("p50_ms", "p99_ms", "max_ms")},
            **{f"baseline_{k}": med(lambda r, k=k: r["baseline"][k])
               for k in ("p50_ms", "p99_ms")},
            "longest_gap_ms": med(lambda r: r["longest_gap_ms"]),
            "ready_s": med(lambda r: max(s["ready_s"] for s in r["steps"])),
            "exit_s": med(lambda r: max(s["exit_s"] for s in r["steps"])),
            **{k: sum(r[k] for r in rounds) for k in ("sent", "lost", "duplicates",
                                                      "error_responses")},
            "exit_codes": sorted({s["exit_code"] for r in rounds for s in r["steps"]}),
            "each": rounds}


def line(row: dict[str, Any]) -> str:
    return (f"{row['way']:7} {row['mode']:7} {row['workers']} workers {row['req_per_s']:.0f} req/s"
            f"  restart p50 {row['restart_p50_ms']} p99 {row['restart_p99_ms']} max "
            f"{row['restart_max_ms']} ms, longest gap {row['longest_gap_ms']} ms  (baseline p50 "
            f"{row['baseline_p50_ms']} p99 {row['baseline_p99_ms']} ms; exit {row['exit_s']} s, "
            f"ready {row['ready_s']} s)  sent {row['sent']} lost {row['lost']} duplicates "
            f"{row['duplicates']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["dynamic", "static"],
                        choices=["dynamic", "static"])
    parser.add_argument("--ways", nargs="+", default=["sigterm"], choices=["sigterm", "kill"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=150.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--note", default="", help="what else the results file should say "
                        "(which code ran, what else used the machine)")
    args = parser.parse_args()
    rows = []
    for way in args.ways:
        for mode in args.modes:
            rounds = []
            for _ in range(args.rounds):
                with tempfile.TemporaryDirectory(prefix="fmnist-rolling-") as tmp:
                    rounds.append(round_(mode, way, args.rate, Path(tmp), args.workers))
            row = summary(rounds)
            rows.append(row)
            print(line(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "what": "two Kafka workers restarted one after the other under steady load; "
                    "latency from sent_at to the worker finishing, medians over rounds",
            "command": "python benchmarks/rolling_restart.py " + " ".join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "note": args.note,
            "results": rows}, indent=2) + "\n")
    return 1 if any(r["lost"] or r["error_responses"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
