"""Where the slowest answers' time goes: the request path, the worker, the answer path.

    .venv/bin/python benchmarks/latency_split.py --rate 200 --seconds 20 [--kind echo]

On a Kafka of its own (free ports), one `fmnist serve --quiet` (or the echo worker) and the
load generator on PNG requests: two warm-up bursts, then open-loop ``--rate`` for ``--seconds``.
Every fmnist answer carries ``timings_ms`` (docs/protocol.md): ``queue_wait`` (the request's
``sent_at`` to the worker taking it: the load generator's produce, the broker, the worker's
fetch and its loop) and ``worker`` (taken to answer built). What is left of the latency the
load generator measured is the answer path (the worker's produce, the broker, the load
generator's fetch). Prints p50 and p99 of each part, the split of the requests at or above
the p99, and the CPU of worker, broker and load generator over the run (cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import peers
from loadgen import LoadGen

from fmnist.testing.run import OwnKafka


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--kind", choices=("fmnist", "echo"), default="fmnist")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fmnist-split-") as tmp:
        kafka = OwnKafka(Path(tmp) / "kafka")
        kafka.up()
        try:
            run(args, kafka, Path(tmp))
        finally:
            kafka.down()
    return 0


def run(args: argparse.Namespace, kafka: OwnKafka, workdir: Path) -> None:
    broker_pid = common.listening_pid(int(kafka.address.rsplit(":", 1)[1]))
    topics = common.Topics("kafka", prefix="split-")
    overrides = {"FMNIST_KAFKA__BOOTSTRAP_SERVERS": kafka.address}
    gen = LoadGen("kafka", topics, overrides)
    worker = common.WorkerProcess(args.kind, topics, overrides, workdir / "worker.log")
    try:
        peers.ready(gen, worker, peers.READY_S)
        for _ in range(2):
            gen.burst(3000, 60)
        pids = {"worker": worker.proc.pid, "broker": broker_pid, "loadgen": os.getpid()}
        before = {k: common.cpu_seconds(p) for k, p in pids.items() if p}
        started_cpu = time.monotonic()
        phase = gen.send_paced(args.rate, args.seconds)
        rids, scheduled = phase.rids, phase.scheduled
        gen.wait_for(rids, 30)
        wall = time.monotonic() - started_cpu
        cores = {k: round((common.cpu_seconds(p) - before[k]) / wall, 2)
                 for k, p in pids.items() if p}
        report(gen, rids, scheduled, args, cores)
    finally:
        worker.stop()
        gen.close()


def report(gen: LoadGen, rids: list[str], scheduled: list[float], args: argparse.Namespace,
           cores: dict[str, float]) -> None:
    rows = []
    for rid, at in zip(rids, scheduled, strict=True):
        answer = gen.answers.get(rid)
        if answer is None:
            continue
        latency = (answer.received_at - at) * 1000
        timings = json.loads(answer.value).get("timings_ms", {}) \
            if answer.value[:1] == b"{" else {}
        queue, work = timings.get("queue_wait") or 0.0, timings.get("worker") or 0.0
        rows.append((latency, queue, work, latency - queue - work))
    table = np.array(rows)
    print(f"{args.kind} at {args.rate:g} req/s for {args.seconds:g} s: {len(rows)} of "
          f"{len(rids)} answered; CPU, cores: {cores}")
    names = ("latency", "request path (queue_wait)", "worker", "answer path (the rest)")
    for q in (50, 99):
        print(f"  p{q}: " + ", ".join(f"{n} {np.percentile(table[:, i], q):.1f} ms"
                                      for i, n in enumerate(names)))
    slow = table[table[:, 0] >= np.percentile(table[:, 0], 99)]
    print(f"  the {len(slow)} answers at or above the p99, mean: " + ", ".join(
        f"{n} {slow[:, i].mean():.1f} ms" for i, n in enumerate(names)))


if __name__ == "__main__":
    sys.exit(main())
