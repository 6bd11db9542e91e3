"""A soak: two `fmnist serve` processes on a Kafka of their own for many minutes, at a steady
rate with a share of bad inputs, while one worker at a time is SIGKILLed (and started again at
once, as a supervisor does) and Kafka is stopped and started once. Every request is accounted
for (docs/reliability.md#soak).

Accounting, per request id: *answered* once an answer arrived (ok, or an error); *dead-lettered*
once a dead letter names it; *lost* when it is neither after the final drain; every answer
after the first is a *duplicate*. A bad input must be answered with its error code and
dead-lettered. Latency is from the first attempt to publish a request to the arrival of its
first answer at the client, for the good requests, by the minute they were sent in. Memory is
each worker process's VmRSS, sampled every few seconds, per process lifetime (a killed worker
starts afresh); its growth is measured from ``Plan.warmup_s`` into the process's life.

``benchmarks/soak.py`` runs it for half an hour; ``tests/integration/test_soak.py`` for two
minutes. Nothing here touches the shared brokers: Kafka is an ``OwnKafka`` on free ports.
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fmnist.client import decode_response
from fmnist.serving import protocol
from fmnist.testing.poison import Poison, poison_cases
from fmnist.testing.processes import WorkerProcess
from fmnist.testing.run import IMAGES, WORKER_START_S, OwnKafka, Run
from fmnist.testing.waiting import poll_until

# The 1 MiB payload is drawn this much less often than the other bad inputs: at 10 bad inputs
# a second, each case equally often, it alone would write about 1.5 GB to each of the request
# and dead-letter topics in half an hour.
BIG_WEIGHT = 0.05


@dataclass(frozen=True)
class Plan:
    """What a soak does, in seconds from the start of its traffic."""

    minutes: float = 30.0
    per_s: float = 100.0
    bad_share: float = 0.10
    kill_every_s: float = 240.0  # SIGKILL one worker (the two in turn) this often
    restart_at_s: float | None = None  # Kafka stopped and started then; default: half-way
    workers: int = 2
    warmup_s: float = 180.0  # a process's RSS growth is measured from this far into its life
    sample_s: float = 5.0  # RSS sampling interval
    drain_s: float = 180.0  # after the traffic, how long every request may take to be answered
    seed: int = 18

    @property
    def seconds(self) -> float:
        return self.minutes * 60

    def restart_at(self) -> float:
        return self.seconds / 2 if self.restart_at_s is None else self.restart_at_s

    def kill_times(self) -> list[float]:
        """Every ``kill_every_s``, up to 15 s before the traffic ends (a kill needs a
        replacement that starts while requests still flow)."""
        times, t = [], self.kill_every_s
        while self.kill_every_s > 0 and t < self.seconds - 15:
            times.append(t)
            t += self.kill_every_s
        return times


class SoakRun(Run):
    """A run that keeps, per answer, only what the accounting needs (its status, error code,
    worker and arrival time), and per dead letter only its headers: half an hour of answers
    and 1 MiB payloads would otherwise fill the client's memory."""

    def __init__(self, workdir: Path, kafka: OwnKafka) -> None:
        super().__init__("kafka", workdir, bootstrap=kafka.address)
        self.env["FMNIST_SERVE__JOURNAL_DIR"] = str(workdir / "journal")
        self.case: dict[str, str] = {}  # request id -> poison case name (bad inputs only)
        self.first_try_ms: dict[str, float] = {}  # request id -> first publish attempt

    def _pump(self, timeout_s: float) -> int:
        got = 0
        for message in self.responses.next_batch(1000, timeout_s=timeout_s):
            body = decode_response(message)
            error = body.get("error") or {}
            self.answers[str(body.get("request_id"))].append({
                "status": body.get("status"), "code": error.get("code"),
                "label": body.get("label"), "worker_id": body.get("worker_id"),
                "at_ms": time.time() * 1000})
            got += 1
        for message in self.dead.next_batch(1000, timeout_s=0):
            headers = {k: v for k, v in message.headers.items()
                       if k.startswith("dlq_") or k == protocol.REQUEST_ID}
            letter = dataclasses.replace(message, value=b"", headers=headers, handle=None)
            self.letters[headers.get("dlq_request_id", "")].append(letter)
            if protocol.REQUEST_ID in headers:
                self.letters_by_sent_id[headers[protocol.REQUEST_ID]].append(letter)
            got += 1
        return got

    def accounted(self, rid: str) -> bool:
        aid = self.answer_id(rid)
        return aid in self.answers or bool(self.letters.get(aid))

    def open_requests(self) -> list[str]:
        with self._lock:
            ids = list(self.expected)
        return [rid for rid in ids if not self.accounted(rid)]


class Traffic:
    """Publishes at ``per_s`` in chunks of a tenth of a second, ``bad_share`` of them drawn from
    the poison cases, until ``stop()``. A chunk the broker does not confirm (it is down) is
    published again, same ids, until it is."""

    def __init__(self, run: SoakRun, plan: Plan) -> None:
        self.run, self.plan = run, plan
        self.cases = {name: case for name, case in poison_cases("kafka").items()}
        self.weights = [BIG_WEIGHT if name == "big_payload" else 1.0 for name in self.cases]
        self.random = random.Random(plan.seed)
        self.sent = 0
        self.failed_publishes = 0
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._publish, name="soak-traffic", daemon=True)

    def start(self) -> Traffic:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self, timeout: float = 60) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _request(self, i: int) -> tuple[str, bytes, dict[str, str], str | None]:
        if self.random.random() < self.plan.bad_share:
            name = self.random.choices(list(self.cases), self.weights)[0]
            case: Poison = self.cases[name]
            rid = f"bad {name} {i}!" if case.malformed_id else f"bad-{name}-{i}"
            self.run.case[rid] = name
            return rid, case.payload, case.headers(rid), None
        image = sorted(IMAGES)[i % len(IMAGES)]
        rid = f"good-{i}"
        return rid, IMAGES[image], protocol.request_headers(rid, "image/png"), image

    def _publish(self) -> None:
        chunk = max(1, round(self.plan.per_s / 10))
        while not self._stop.is_set():
            batch = [self._request(self.sent + j) for j in range(chunk)]
            first_try = time.time() * 1000
            failed = self.run.send_until_confirmed(batch, self._stop)
            if failed is None:
                return
            self.failed_publishes += failed
            with self.run._lock:  # results() copies it from another thread
                self.run.first_try_ms.update({rid: first_try for rid, *_ in batch})
            self.sent += len(batch)
            self._stop.wait(max(0.0, self.started + self.sent / self.plan.per_s
                                - time.monotonic()))


@dataclass
class Life:
    """One worker process: its slot, when it started and ended (seconds of the soak), and its
    RSS samples (seconds of the soak, MB)."""

    slot: int
    pid: int
    started_s: float
    ended_s: float | None = None
    how: str = ""  # "SIGKILL", or how it ended otherwise
    rss: list[tuple[float, float]] = field(default_factory=list)

    def by_minute(self) -> list[float]:
        """The last RSS sample of each minute of the process's life (its first minute first)."""
        minutes: dict[int, float] = {}
        for t, mb in self.rss:
            minutes[int((t - self.started_s) // 60)] = round(mb, 1)
        return [minutes[m] for m in sorted(minutes)]

    def growth(self, warmup_s: float) -> dict[str, Any] | None:
        """RSS from ``warmup_s`` into the process's life to its last sample; None if it did
        not live a minute beyond the warm-up."""
        after = [(t, mb) for t, mb in self.rss if t - self.started_s >= warmup_s]
        if not after or after[-1][0] - after[0][0] < 60:
            return None
        first, last = after[0][1], after[-1][1]
        return {"from_mb": round(first, 1), "to_mb": round(last, 1),
                "max_mb": round(max(mb for _, mb in after), 1),
                "growth_pct": round(100 * (last - first) / first, 2),
                "over_s": round(after[-1][0] - after[0][0])}


class Soak:
    """The soak itself: ``run()`` returns its results (``results()``); ``on_minute`` is called
    with the results so far at the end of every minute (the script writes them)."""

    def __init__(self, plan: Plan, workdir: Path,
                 on_minute: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.plan, self.workdir, self.on_minute = plan, workdir, on_minute
        self.kafka = OwnKafka(workdir / "kafka")
        self.lives: list[Life] = []
        self.slots: list[WorkerProcess | None] = [None] * plan.workers
        self.events: list[dict[str, Any]] = []
        self.t0, self.t0_wall_ms = time.monotonic(), time.time() * 1000
        self.run: SoakRun | None = None
        self.traffic: Traffic | None = None
        self.phase = "starting"
        self.drain_s: float | None = None
        self._restart: threading.Thread | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, what: str, **facts: Any) -> None:
        self.events.append({"at_s": round(self.now(), 1), "what": what, **facts})

    # -- workers --

    def _start(self, run: SoakRun, slot: int) -> WorkerProcess:
        worker = run.start_worker()
        self.slots[slot] = worker
        self.lives.append(Life(slot, worker.proc.pid, self.now()))
        return worker

    def _life(self, worker: WorkerProcess) -> Life:
        return next(life for life in self.lives if life.pid == worker.proc.pid)

    def _supervise(self, run: SoakRun) -> None:
        """Start a worker again in any slot whose process has exited."""
        for slot, worker in enumerate(self.slots):
            if worker is not None and not worker.alive():
                life = self._life(worker)
                life.ended_s = self.now()
                life.how = life.how or f"exit {worker.proc.returncode}"
                worker.log.close()
                self.event("worker exited", slot=slot, pid=worker.proc.pid, how=life.how)
                self.event("worker started", slot=slot, pid=self._start(run, slot).proc.pid)

    def _kill(self, slot: int) -> None:
        worker = self.slots[slot]
        assert worker is not None
        self._life(worker).how = "SIGKILL"
        worker.proc.kill()
        self.event("SIGKILL", slot=slot, pid=worker.proc.pid)

    def _sample(self) -> None:
        for worker in self.slots:
            if worker is not None and worker.alive():
                rss = worker.memory_mb().get("VmRSS")
                if rss:
                    self._life(worker).rss.append((self.now(), rss))

    def _restart_kafka(self) -> None:
        """In a thread of its own: answers are read and workers supervised meanwhile."""
        self.event("Kafka stopping")
        try:
            down_s = self.kafka.down()
            self.event("Kafka stopped", took_s=round(down_s, 1))
            up_s = self.kafka.up()
            self.event("Kafka started", took_s=round(up_s, 1))
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:  # the figures say so
            self.event("Kafka restart failed", error=str(e)[-2000:])

    # -- the soak --

    def run_soak(self) -> dict[str, Any]:
        try:
            run = SoakRun(self.workdir, self.kafka)
            with run:
                self.run = run
                # The workers load their model while Kafka starts; they wait for it (with
                # growing pauses) as they would for a broker that is late.
                for slot in range(self.plan.workers):
                    self._start(run, slot)
                self.kafka.up()
                return self._soak(run)
        finally:
            if self._restart is not None:
                self._restart.join(300)
            self.kafka.down()

    def _soak(self, run: SoakRun) -> dict[str, Any]:
        run.open()
        # Ready: each worker has answered (each has partitions of the request topic).
        warm = 0

        def both_answered() -> bool:
            nonlocal warm
            self._supervise(run)
            run.wait_answered(run.send_good(f"warm{warm}", 8), timeout=WORKER_START_S)
            warm += 1
            return len(run.by_worker()) >= self.plan.workers

        poll_until(both_answered, WORKER_START_S * 2, interval=0, message="answers from each worker")
        with run._lock:
            warm_ids = set(run.expected)
        # The soak's clock starts with the traffic; the first workers started before it.
        shift = time.monotonic() - self.t0
        self.t0, self.t0_wall_ms = time.monotonic(), time.time() * 1000
        for life in self.lives:
            life.started_s -= shift
        self.event("traffic started")
        self.phase = "traffic"
        self.traffic = Traffic(run, self.plan).start()
        kills = self.plan.kill_times()
        restart_at = self.plan.restart_at()
        next_sample = 0.0
        next_minute = 60.0
        try:
            while self.now() < self.plan.seconds:
                run.pump(timeout_s=0.1)
                self._supervise(run)
                if kills and self.now() >= kills[0]:
                    kills.pop(0)
                    self._kill(sum(1 for e in self.events if e["what"] == "SIGKILL")
                               % self.plan.workers)
                if self._restart is None and self.now() >= restart_at:
                    self._restart = threading.Thread(target=self._restart_kafka, daemon=True)
                    self._restart.start()
                if self.now() >= next_sample:
                    self._sample()
                    next_sample += self.plan.sample_s
                if self.now() >= next_minute:
                    next_minute += 60
                    if self.on_minute:
                        self.on_minute(self.results(warm_ids))
        finally:
            self.traffic.stop()
            self.event("traffic stopped", sent=self.traffic.sent)
        self.phase = "drain"
        if self._restart is not None:
            self._restart.join(300)
        drained = time.monotonic()
        deadline = drained + self.plan.drain_s
        while run.open_requests() and time.monotonic() < deadline:
            run.pump(timeout_s=0.2)
            self._supervise(run)
            if self.now() >= next_sample:
                self._sample()
                next_sample += self.plan.sample_s
        run.drain(quiet_s=2, timeout=30)
        self.drain_s = time.monotonic() - drained
        self.phase = "done"
        self._sample()
        return self.results(warm_ids)

    # -- the figures --

    def results(self, skip: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
        run = self.run
        assert run is not None
        with run._lock:
            ids = [rid for rid in run.expected if rid not in skip]
            first_try = dict(run.first_try_ms)
        cases = run.case
        traffic_cases = poison_cases("kafka")
        start_ms = self.t0_wall_ms
        last = max(0, int(np.ceil(self.plan.seconds / 60)) - 1)
        totals: Counter[str] = Counter()
        letters_by_code: Counter[str] = Counter()
        good_lettered: list[dict[str, Any]] = []
        bad_wrong: list[dict[str, Any]] = []
        per_minute: dict[int, dict[str, Any]] = defaultdict(lambda: {"sent": 0, "bad": 0,
                                                                     "ms": []})
        for rid in ids:
            aid = run.answer_id(rid)
            answers = run.answers.get(aid, [])
            letters = run.letters.get(aid, [])
            case = cases.get(rid)
            totals["sent"] += 1
            totals["bad" if case else "good"] += 1
            totals["answered"] += bool(answers)
            totals["answered_ok"] += bool(answers) and answers[0]["status"] == "ok"
            totals["answered_error"] += bool(answers) and answers[0]["status"] != "ok"
            totals["dead_lettered"] += bool(letters)
            totals["duplicates"] += max(0, len(answers) - 1)
            totals["duplicate_letters"] += max(0, len(letters) - 1)
            totals["lost"] += not answers and not letters
            for letter in letters[:1]:
                letters_by_code[letter.headers.get("dlq_error_code", "?")] += 1
            if case:
                want = traffic_cases[case].code
                codes = {a["code"] for a in answers} | {
                    letter.headers.get("dlq_error_code") for letter in letters}
                if not letters or codes != {want}:
                    bad_wrong.append({"request_id": rid, "case": case, "want": want,
                                      "codes": sorted(map(str, codes)),
                                      "dead_lettered": bool(letters)})
            elif letters or (answers and answers[0]["status"] != "ok"):
                good_lettered.append({"request_id": rid, "codes": sorted(
                    {str(a["code"]) for a in answers}
                    | {str(letter.headers.get("dlq_error_code")) for letter in letters})})
            if rid in first_try:  # the last chunk may end a moment after the last minute
                minute = per_minute[min(int((first_try[rid] - start_ms) // 60_000), last)]
                minute["sent"] += 1
                minute["bad"] += bool(case)
                if not case and answers and answers[0]["status"] == "ok":
                    minute["ms"].append(answers[0]["at_ms"] - first_try[rid])
        return {
            "phase": self.phase, "plan": asdict(self.plan),
            "seconds": round(self.now(), 1),
            "drain_s": None if self.drain_s is None else round(self.drain_s, 1),
            **{k: totals[k] for k in ("sent", "good", "bad", "answered", "answered_ok",
                                      "answered_error", "dead_lettered", "lost", "duplicates",
                                      "duplicate_letters")},
            "dead_letters_by_code": dict(letters_by_code.most_common()),
            "good_dead_lettered_or_errored": good_lettered[:50],
            "good_dead_lettered_or_errored_count": len(good_lettered),
            "bad_mishandled": bad_wrong[:50], "bad_mishandled_count": len(bad_wrong),
            "failed_publishes": self.traffic.failed_publishes if self.traffic else 0,
            "answers_by_worker": dict(run.by_worker()),
            "minutes": [self._minute(m, per_minute[m]) for m in sorted(per_minute)],
            "processes": [self._process(life) for life in self.lives],
            "events": self.events,
            "kills": sum(1 for e in self.events if e["what"] == "SIGKILL"),
            "kafka_restarts": sum(1 for e in self.events if e["what"] == "Kafka started"),
        }

    def _minute(self, m: int, row: dict[str, Any]) -> dict[str, Any]:
        ms = row["ms"]
        rss: dict[str, float] = {}
        for life in self.lives:
            inside = [mb for t, mb in life.rss if m * 60 <= t < (m + 1) * 60]
            if inside:
                rss[f"{life.slot}:{life.pid}"] = round(inside[-1], 1)
        return {"minute": m, "sent": row["sent"], "bad": row["bad"], "answered_ok": len(ms),
                "p50_ms": round(float(np.percentile(ms, 50)), 1) if ms else None,
                "p99_ms": round(float(np.percentile(ms, 99)), 1) if ms else None,
                "rss_mb": rss}

    def _process(self, life: Life) -> dict[str, Any]:
        return {"slot": life.slot, "pid": life.pid, "started_s": round(life.started_s, 1),
                "ended_s": None if life.ended_s is None else round(life.ended_s, 1),
                "how": life.how or "ran to the end", "samples": len(life.rss),
                "rss_first_mb": round(life.rss[0][1], 1) if life.rss else None,
                "rss_last_mb": round(life.rss[-1][1], 1) if life.rss else None,
                "rss_mb_by_minute_of_life": life.by_minute(),
                "growth": life.growth(self.plan.warmup_s)}


def rss_growth_ok(results: dict[str, Any], limit_pct: float = 5.0) -> bool:
    """Every process that lived a minute beyond its warm-up grew at most ``limit_pct``."""
    return all(p["growth"] is None or p["growth"]["growth_pct"] <= limit_pct
               for p in results["processes"])


def dump(results: dict[str, Any], path: Path) -> None:
    """Write atomically: a reader (or an interrupted run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


__all__ = ["BIG_WEIGHT", "Life", "Plan", "Soak", "SoakRun", "Traffic", "dump", "rss_growth_ok"]
