"""Registry scenarios, shared by tests/integration/test_registry.py and
benchmarks/rollout.py: two workers with homes of their own (no shared weights directory) follow
promotions and rollbacks while requests flow, and refuse bad models while serving on.
"""

from __future__ import annotations

import socket
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from fmnist import config
from fmnist.brokers import Consumer
from fmnist.registry import ops
from fmnist.registry.protocol import Manifest, event, parse_event
from fmnist.registry.store import Store, open_store
from fmnist.testing import models
from fmnist.testing.processes import ROOT, WorkerProcess
from fmnist.testing.run import WORKER_START_S, Report, Run, Stream, free_port

SHIPPED = ROOT / "weights" / "fmnist.keras"


class Fleet:
    """A Run with a registry of its own (topics, or a directory for Pub/Sub), the
    announcements read from before anything is published, and workers in separate homes."""

    def __init__(self, run: Run, workdir: Path) -> None:
        self.run, self.workdir = run, workdir
        tag = run.topics.group.rsplit("-", 1)[-1]
        settings = {"topic": f"models-{tag}", "blob_topic": f"models-{tag}.blobs",
                    "events_topic": f"model-events-{tag}", "dir": str(workdir / "store"),
                    "check_every_s": 30.0}
        run.env.update({config.env_name(f"registry.{k}"): str(v) for k, v in settings.items()})
        self.cfg = config.with_overrides(run.cfg, {"registry": settings}, "the scenario")
        run.open()
        self.store: Store = open_store(self.cfg, run.broker)
        run.broker.ensure_topics([self.cfg.registry.events_topic])
        self.events_reader: Consumer = run.broker.consumer(self.cfg.registry.events_topic,
                                                           group=None)
        self.events: list[dict[str, Any]] = []
        self.ids: list[str] = []  # worker ids, in start order

    def publish(self, weights: Path) -> Manifest:
        return ops.publish(self.cfg, self.run.broker, self.store, weights)

    def publish_damaged(self, good: Path) -> Manifest:
        """What a store holds after its copy of ``good`` was damaged: a manifest whose SHA-256
        the bytes no longer match (publishing itself would hash the damaged bytes)."""
        manifest, damaged = models.corrupt_manifest(good, self.workdir / "damaged.keras")
        stored = self.store.put(manifest, damaged)
        ops.announce(self.cfg, self.run.broker, event("published", stored.name, stored.version))
        return stored

    def promote(self, ref: str) -> float:
        """Promote ``ref``; returns when it was asked (time.time() before the call): a worker
        may refuse or switch before the call returns, and its announcement must count."""
        asked = time.time()
        ops.promote(self.cfg, self.run.broker, self.store, ref)
        return asked

    def rollback(self) -> float:
        """Roll back; returns when it was asked, as ``promote``."""
        asked = time.time()
        ops.rollback(self.cfg, self.run.broker, self.store, self.cfg.model.name)
        return asked

    def start_workers(self, n: int, **env: str) -> list[WorkerProcess]:
        started = []
        for i in range(n):
            home = self.workdir / f"home-{len(self.ids)}"
            worker = self.run.start_worker(HOME=str(home),
                                           FMNIST_MODEL__WEIGHTS_DIR=str(home / "weights"),
                                           **(env if i == 0 else {}))
            self.ids.append(f"{socket.gethostname()}-{worker.proc.pid}")
            started.append(worker)
        return started

    def read_events(self) -> list[dict[str, Any]]:
        batch = self.events_reader.next_batch(500, timeout_s=0.2)
        self.events_reader.commit(batch)
        fresh = [e for m in batch if (e := parse_event(m)) is not None]
        self.events.extend(fresh)
        self.run.pump(timeout_s=0)
        return fresh

    def wait_for(self, kind: str, version: str, workers: list[str], since: float,
                 timeout: float) -> dict[str, dict[str, Any]]:
        """The first ``kind`` announcement of ``version`` from each of ``workers`` after
        ``since`` (time.time())."""
        deadline = time.monotonic() + timeout
        while True:
            found = {}
            for e in self.events:
                if (e["type"] == kind and e["version"] == version and e["time"] >= since
                        and e.get("worker_id") in workers and e["worker_id"] not in found):
                    found[e["worker_id"]] = e
            if len(found) == len(workers):
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"after {timeout} s, {kind} {version} announced by {sorted(found)} of "
                    f"{workers}; announcements: {[(e['type'], e['version'], e.get('worker_id'), e.get('reason')) for e in self.events[-12:]]}\n"  # noqa: E501
                    f"{self.run.logs()}")
            self.read_events()

    def hold(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            self.read_events()

    def answers_by_worker(self) -> dict[str, list[tuple[float, str]]]:
        """(finished at, version) of every first answer, per worker, in order."""
        out: dict[str, list[tuple[float, str]]] = defaultdict(list)
        for rid, answers in self.run.answers.items():
            first = answers[0]
            total = (first.get("timings_ms") or {}).get("total")
            if rid in self.run.sent_at_ms and total is not None:
                out[first["worker_id"]].append(((self.run.sent_at_ms[rid] + total) / 1000,
                                                first["model"]["version"]))
        return {w: sorted(seq) for w, seq in out.items()}

    def close(self) -> None:
        self.events_reader.close()


def switches(sequence: list[tuple[float, str]]) -> list[str]:
    """The versions a worker answered with, each run of one version once: [v1, v2, v1]."""
    runs: list[str] = []
    for _, version in sequence:
        if not runs or runs[-1] != version:
            runs.append(version)
    return runs


def first_answer(sequence: list[tuple[float, str]], version: str, since: float) -> float | None:
    return next((t for t, v in sequence if v == version and t >= since), None)


def rollout(broker_name: str, workdir: Path, per_s: float = 50.0, hold_s: float = 3.0) -> Report:
    """v1 promoted, two workers start with empty homes (they fetch it); with requests flowing
    at ``per_s`` (0: idle), promote v2, then roll back. Convergence is timed from each command
    to each worker's ``serving`` announcement and to its first answer from the new version."""
    with Run(broker_name, workdir) as run:
        fleet = Fleet(run, workdir)
        try:
            v1 = fleet.publish(SHIPPED)
            v2 = fleet.publish(models.variant(SHIPPED, workdir / "v2" / "fmnist.keras"))
            start = fleet.promote(v1.ref)
            workers = fleet.start_workers(2)
            up = fleet.wait_for("serving", v1.version, fleet.ids, start, WORKER_START_S)
            cold = {w: round(e["time"] - p.started, 2) for (w, e), p in zip(
                sorted(up.items(), key=lambda kv: fleet.ids.index(kv[0])), workers, strict=True)}
            stream = Stream(run, "rollout", 10**7, per_s).start() if per_s else None
            fleet.hold(hold_s)
            promoted_at = fleet.promote(v2.ref)
            to_v2 = fleet.wait_for("serving", v2.version, fleet.ids, promoted_at, 60)
            fleet.hold(hold_s)
            rolled_at = fleet.rollback()
            to_v1 = fleet.wait_for("serving", v1.version, fleet.ids, rolled_at, 60)
            fleet.hold(hold_s)
            if stream:
                stream.stop()
            if not per_s:  # idle: a few requests show which version answers now
                run.send_good("after", 20)
            run.wait_answered(timeout=60)
            run.drain(quiet_s=1.0)
            seqs = fleet.answers_by_worker()
            stale = sum(_stale(seqs.get(w, []), v2.version, to_v2[w]["time"], rolled_at)
                        + _stale(seqs.get(w, []), v1.version, to_v1[w]["time"], float("inf"))
                        for w in fleet.ids)
            facts: dict[str, Any] = {
                "stale_answers": stale,
                "v1": v1.version, "v2": v2.version, "workers": fleet.ids,
                "cold_start_s": cold,
                "promote_s": {w: round(e["time"] - promoted_at, 2) for w, e in to_v2.items()},
                "rollback_s": {w: round(e["time"] - rolled_at, 2) for w, e in to_v1.items()},
                "prepare_s": {w: e.get("prepare_s") for w, e in to_v2.items()},
                "switches": {w: switches(s) for w, s in seqs.items()},
                "first_v2_answer_s": {w: _after(first_answer(s, v2.version, promoted_at),
                                                promoted_at) for w, s in seqs.items()},
                "first_v1_answer_after_rollback_s": {
                    w: _after(first_answer(s, v1.version, rolled_at), rolled_at)
                    for w, s in seqs.items()},
                "answers_by_worker": {w: len(s) for w, s in seqs.items()},
            }
            slowest = max([*facts["promote_s"].values(), *facts["rollback_s"].values()])
            return run.report(f"promote and roll back at {per_s:g} req/s", **facts,
                              note=f"slowest worker converged in {slowest:.2f} s")
        finally:
            fleet.close()


def _stale(sequence: list[tuple[float, str]], version: str, switched: float, until: float,
           overlap_s: float = 0.5) -> int:
    """Answers from another version than ``version`` that finished between ``overlap_s`` after
    the worker announced its switch to it and ``until``. The overlap: a batch prepared on the
    old model just before the swap may finish just after it."""
    return sum(1 for t, v in sequence if switched + overlap_s <= t < until and v != version)


def _after(t: float | None, since: float) -> float | None:
    return round(t - since, 3) if t is not None else None


def refusals(broker_name: str, workdir: Path, per_s: float = 20.0) -> Report:
    """v1 serving on two workers; a damaged, an incompatible and a canary-failing model are
    promoted in turn while requests flow. Each is refused by both workers, which serve v1 on."""
    with Run(broker_name, workdir) as run:
        fleet = Fleet(run, workdir)
        try:
            v1 = fleet.publish(SHIPPED)
            start = fleet.promote(v1.ref)
            port = free_port()
            fleet.start_workers(2, FMNIST_SERVE__METRICS_PORT=str(port))
            fleet.wait_for("serving", v1.version, fleet.ids, start, WORKER_START_S)
            stream = Stream(run, "refusals", 10**7, per_s).start()
            bad = {
                "checksum": fleet.publish_damaged(
                    models.variant(SHIPPED, workdir / "v3" / "fmnist.keras", seed=3)),
                "incompatible": fleet.publish(
                    models.wrong_input(SHIPPED, workdir / "wide" / "fmnist.keras")),
                "canary": fleet.publish(
                    models.failing_canary(SHIPPED, workdir / "blind" / "fmnist.keras")),
            }
            refused: dict[str, dict[str, str]] = {}
            for reason, manifest in bad.items():
                at = fleet.promote(manifest.ref)
                seen = fleet.wait_for("refused", manifest.version, fleet.ids, at, 60)
                refused[reason] = {w: e["reason"] for w, e in seen.items()}
            fleet.hold(1.0)
            from fmnist.testing.waiting import http_get

            status, metrics = http_get(f"http://127.0.0.1:{port}/metrics")
            stream.stop()
            run.wait_answered(timeout=60)
            run.drain(quiet_s=1.0)
            shown = ops.show(fleet.cfg, run.broker, fleet.store, fleet.cfg.model.name)
            seqs = fleet.answers_by_worker()
            return run.report(
                "refuse bad models, serve on", refused=refused, metrics=metrics,
                metrics_status=status, versions={b: m.version for b, m in bad.items()},
                v1=v1.version, switches={w: switches(s) for w, s in seqs.items()},
                shown_refusals=shown["refusals"], workers=fleet.ids,
                alive=[w.alive() for w in run.workers],
                note="every worker refused each bad model and answered with v1 throughout")
        finally:
            fleet.close()
