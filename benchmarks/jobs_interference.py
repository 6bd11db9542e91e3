"""Prediction latency on a machine that also runs a training job (in a job worker process).

    .venv/bin/python benchmarks/jobs_interference.py [--rate 50] [--seconds 20] [--rounds 2]
        [--out FILE.json]

One serving worker (`fmnist serve`, default settings) on Kafka, paced load at ``rate`` req/s,
in three conditions, alternated per round: no job; a training job in a job worker with every
core (`train.threads` 0); the same job with `train.threads` 1. Prints the medians of p50 and
p99 per condition.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import ROOT, WorkerProcess, bench_topics
from loadgen import LoadGen

from fmnist import config
from fmnist.brokers import connect
from fmnist.jobs import client, history
from fmnist.testing.processes import WorkerProcess as HarnessProcess

JOB = {"train": {"epochs": 30, "limit": 30000, "teacher": None}, "model": {"name": "bench-job"}}


def training_started(cfg: config.Config, job_id: str, timeout_s: float = 180) -> None:
    b = connect("kafka", cfg)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(e["job_id"] == job_id and e.get("phase") == "fit"
                   for e in history.read(b, cfg.jobs.events_topic)):
                return
            time.sleep(1)
        raise SystemExit(f"job {job_id} did not start training within {timeout_s} s")
    finally:
        b.close()


def with_job(threads: int, topics: Any, work: Path, measure: Any) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    env = {"FMNIST_JOBS__TOPIC": f"bench-jobs-{tag}", "FMNIST_JOBS__EVENTS_TOPIC":
           f"bench-jobevents-{tag}", "FMNIST_JOBS__DLQ_TOPIC": f"bench-jobs-{tag}.dlq",
           "FMNIST_MODEL__WEIGHTS_DIR": str(work), "FMNIST_TRAIN__THREADS": str(threads),
           "FMNIST_KAFKA__GROUP_ID": f"bench-jobworkers-{tag}"}
    worker = HarnessProcess(topics, work / f"jobworker-{tag}.log", "--jobs", env=env)
    cfg = config.load(env=topics.env(env))
    b = connect("kafka", cfg)
    try:
        job = client.submit(b, cfg, "train", JOB)
        training_started(cfg, job.job_id)
        result = measure()
        client.cancel(b, cfg, job.job_id)
        return result
    finally:
        worker.stop(timeout=30)
        b.delete_topics([env["FMNIST_JOBS__TOPIC"], env["FMNIST_JOBS__EVENTS_TOPIC"],
                         env["FMNIST_JOBS__DLQ_TOPIC"]])
        b.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fmnist-bench-jobs-"))
    topics = bench_topics("kafka")
    serving = WorkerProcess("fmnist", topics, {}, work / "serve.log")
    load = LoadGen("kafka", topics, {})
    runs: dict[str, list[dict[str, Any]]] = {"no job": [], "job, train.threads 0": [],
                                            "job, train.threads 1": []}
    try:
        if not load.ready(1, 120):
            raise SystemExit(f"the serving worker never answered; see {work / 'serve.log'}")

        def measure() -> dict[str, Any]:
            return load.paced(args.rate, args.seconds)

        for _ in range(args.rounds):
            runs["no job"].append(measure())
            runs["job, train.threads 0"].append(with_job(0, topics, work, measure))
            runs["job, train.threads 1"].append(with_job(1, topics, work, measure))
    finally:
        load.close()
        serving.stop()
    summary = {name: {"p50_ms": statistics.median(r["p50_ms"] for r in rs),
                      "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                      "answered": sum(r["answered"] for r in rs),
                      "requests": sum(r["requests"] for r in rs)}
               for name, rs in runs.items()}
    for name, s in summary.items():
        print(f"{name:22} p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms  "
              f"({s['answered']}/{s['requests']} answered) at {args.rate:g} req/s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": {"command": " ".join(sys.argv), "root": str(ROOT)},
                                        "summary": summary, "runs": runs}, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
