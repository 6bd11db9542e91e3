"""fmnist's benchmark, against the ceiling its broker and client library set, in one run.

    .venv/bin/python benchmarks/bench.py            # the full run (`make bench`), ~9 min
    .venv/bin/python benchmarks/bench.py --smoke    # a few seconds per broker: does it still work

Measures (see BENCHMARKS.md): the model alone (images/s by batch size, single-image latency),
then per broker and worker count the echo worker (the ceiling) and fmnist end to end: cold start
(process start -> first answer to a request already waiting), saturation throughput (a burst of
N requests, answered/s), latency p50/p95/p99 at fixed offered rates (open loop) and the worker's
peak RSS. Every figure is the median of --runs runs (runs are interleaved across
configurations, so slow drift hits them all alike). Results: benchmarks/results/<timestamp>.json,
latest.json, latest.md and latest.png. Prints PASS/FAIL per target; exits 0 unless --strict.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import cpu_profile
import report
from common import PYTHON, ROOT, WorkerProcess, bench_topics, machine, training_running
from loadgen import LoadGen

from fmnist import config
from fmnist.brokers import connect
from fmnist.errors import FmnistError

RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--smoke", action="store_true", help="tiny counts, 1 run, one rate")
    ap.add_argument("--brokers", default="kafka,pubsub")
    ap.add_argument("--kinds", default="echo,fmnist", help="echo (the ceiling) and/or fmnist")
    ap.add_argument("--kafka-workers", type=ints, default=[1, 2])
    ap.add_argument("--pubsub-workers", type=ints, default=[1])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--burst", type=int, default=3000, help="requests in the saturation burst")
    ap.add_argument("--bursts", type=int, default=3,
                    help="saturation bursts per run; a run's figure is their median")
    ap.add_argument("--rates", type=floats, default=[50, 200, 1000], help="offered req/s")
    ap.add_argument("--seconds", type=float, default=5.0, help="per offered rate")
    ap.add_argument("--model-threads", type=ints, default=[1, 2],
                    help="inference threads for the model-only part")
    ap.add_argument("--model-backends", default="jax,tensorflow",
                    help="Keras backends for the model-only part (serve.backend)")
    ap.add_argument("--no-model", action="store_true", help="skip the model-only part")
    ap.add_argument("--model-only", action="store_true", help="only the model-only part")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override for workers and load generator (FMNIST_ env), "
                         "e.g. serve.threads=1; repeatable")
    ap.add_argument("--profile", type=Path, metavar="FILE",
                    help="py-spy (on PATH, in the venv or /tmp/pyspy) the worker of the first "
                         "fmnist configuration during its measured phases, run N into FILE-N")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tag", default="", help="added to the result file's name")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = ap.parse_args(argv)
    if args.smoke:
        args.runs, args.burst, args.bursts, args.rates, args.seconds = 1, 100, 1, [50.0], 2.0
        args.kafka_workers, args.pubsub_workers, args.model_threads = [1], [1], [0]
        args.model_backends = "auto"
    return args


def overrides_env(sets: list[str]) -> dict[str, str]:
    env = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            sys.exit(f"bench: --set wants SECTION.KEY=VALUE, got {item!r}")
        env[config.env_name(key)] = value
    return env


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- model only --------------------------------------------------------------------------------

def model_only(args: argparse.Namespace, weights: Path) -> dict[str, Any]:
    out = {}
    for backend, threads in [(b, t) for b in args.model_backends.split(",")
                             for t in args.model_threads]:
        cmd = [PYTHON, str(ROOT / "benchmarks" / "model_bench.py"), "--weights", str(weights),
               "--threads", str(threads), "--runs", str(args.runs), "--backend", backend]
        if args.smoke:
            cmd += ["--batches", "1,8", "--seconds", "0.2", "--latency-calls", "30"]
        log(f"model only, {backend} backend, {threads or 'all'} inference thread(s)")
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env={"TF_CPP_MIN_LOG_LEVEL": "3", **os.environ})
        if done.returncode != 0:
            raise SystemExit(f"bench: model_bench failed:\n{done.stderr[-3000:]}")
        raw = json.loads(done.stdout.strip().splitlines()[-1])
        figures = report.aggregate(raw["runs"])
        figures.update(per_request_us=raw["per_request_us"], load_and_warm_s=raw["load_and_warm_s"],
                       runs=raw["runs"])
        out[f"{raw['backend']}, {raw['threads']} thread(s)"] = figures
    return out


# -- end to end --------------------------------------------------------------------------------

def model_loads(text: str) -> int:
    return text.count("loaded and warmed in")


def children(pid: int) -> int:
    try:
        return sum(len(p.read_text().split()) for p in Path(f"/proc/{pid}/task").glob("*/children"))
    except OSError:
        return 0


def run_once(args: argparse.Namespace, broker: str, kind: str, workers: int,
             overrides: dict[str, str], logdir: Path, profile: Path | None) -> dict[str, Any]:
    """One run of one configuration, from fresh topics and fresh worker processes."""
    topics = bench_topics(broker)
    gen = LoadGen(broker, topics, overrides)
    procs: list[WorkerProcess] = []
    result: dict[str, Any] = {}
    try:
        probe = gen.send(1)  # waiting before the worker exists: cold start to first answer
        tag = f"{broker}-{kind}-{workers}w-{topics.group[-10:]}"
        procs.append(WorkerProcess(kind, topics, overrides, logdir / f"{tag}-0.log"))
        if not gen.wait_for(probe, 120):
            raise RuntimeError(f"no answer within 120 s from the cold-started worker:\n"
                               f"{procs[0].output()[-2000:]}")
        result["cold_start_s"] = gen.answers[probe[0]].received_at - procs[0].started
        for i in range(1, workers):
            procs.append(WorkerProcess(kind, topics, overrides, logdir / f"{tag}-{i}.log"))
        seen = gen.ready(workers, 120)
        if len(seen) < workers:
            raise RuntimeError(f"only {len(seen)} of {workers} workers answered within 120 s")
        gen.burst(min(200, args.burst), 60)  # warm every path; not measured
        if profile is not None:
            procs[0].profile(profile)
        pids = {"worker": [p.proc.pid for p in procs], "broker": [broker_pid(broker, overrides)],
                "loadgen": [os.getpid()]}
        # Back-to-back bursts of one run differ by 10-20% here
        # (benchmarks/results/tuning/2026-11-29-interleaved-bursts/): a run's figure
        # is the median of a few, and CPU is measured over all of them.
        before, wall = cpu_snapshot(pids), time.monotonic()
        bursts = [gen.burst(args.burst, max(60, args.burst / 20)) for _ in range(args.bursts)]
        after, wall = cpu_snapshot(pids), time.monotonic() - wall
        result["saturation"] = sat = report.aggregate(bursts)
        sat["bursts_answered_per_s"] = [b.get("answered_per_s") for b in bursts]
        answered = sum(b["answered"] for b in bursts)
        sat["cpu_cores_busy"] = {k: (after[k] - before[k]) / wall for k in pids}
        # Everything else on the machine (another test run, a training): should be ~0.
        sat["cpu_cores_busy"]["other"] = max(0.0, (after["machine"] - before["machine"]) / wall
                                             - sum(sat["cpu_cores_busy"].values()))
        sat["cpu_ms_per_request"] = {k: 1000 * (after[k] - before[k]) / max(1, answered)
                                     for k in pids}
        result["rates"] = [gen.paced(r, args.seconds) for r in args.rates]
        mem = [p.memory_mb() for p in procs]
        result["rss_peak_mb"] = max(m.get("VmHWM", 0) for m in mem)
        result["rss_now_mb"] = max(m.get("VmRSS", 0) for m in mem)
        result["child_processes"] = max(children(p.proc.pid) for p in procs)
        result["duplicates"] = gen.duplicates
    finally:
        codes = [p.stop() for p in procs]
        gen.close()
    if kind == "fmnist":
        result["model_loads_per_process"] = max(model_loads(p.output()) for p in procs)
        if found := re.search(r"loaded and warmed in ([\d.]+) s", procs[0].output()):
            result["cold_start_model_load_s"] = float(found.group(1))  # part of cold_start_s
    result["exit_codes"] = codes
    return result


def broker_pid(broker: str, overrides: dict[str, str]) -> int | None:
    cfg = config.load(env={**os.environ, **overrides})
    address = connect(broker, cfg).address.split(",")[0]
    try:
        return common.listening_pid(int(address.rsplit(":", 1)[1]))
    except (IndexError, ValueError):
        return None


def cpu_snapshot(pids: dict[str, list[int | None]]) -> dict[str, float]:
    """CPU seconds used so far by each group of processes (the worker(s), broker, load generator)."""
    snapshot = {k: sum(common.cpu_seconds(p) for p in v if p) for k, v in pids.items()}
    return {**snapshot, "machine": common.machine_busy_seconds()}


def start_brokers(names: list[str], cfg: config.Config) -> list[str]:
    """Brokers that do not answer and are the local ones are started (and later stopped) with
    scripts/brokers, as `make test` does; a remote one that does not answer is an error."""
    started = []
    for name in names:
        b = connect(name, cfg)
        try:
            b.check(3)
            continue
        except FmnistError:
            local = b.address in ("127.0.0.1:9092", "127.0.0.1:8085")
            if not local:
                raise
        finally:
            b.close()
        log(f"starting the local {name} broker (scripts/brokers up {name}); stopped at the end")
        subprocess.run([str(ROOT / "scripts" / "brokers"), "up", name], check=True, timeout=300)
        started.append(name)
    return started


def end_to_end(args: argparse.Namespace, brokers: list[str], kinds: list[str],
               overrides: dict[str, str], result: dict[str, Any]) -> None:
    plan = [(b, k, w) for b in brokers
            for w in (args.kafka_workers if b == "kafka" else args.pubsub_workers) for k in kinds]
    profiled = next((p for p in plan if p[1] == "fmnist"), None) if args.profile else None
    runs: dict[tuple[str, str, int], list[Any]] = {p: [] for p in plan}
    with tempfile.TemporaryDirectory(prefix="fmnist-bench-") as tmp:
        for run in range(args.runs):  # interleaved: drift hits every configuration alike
            for b, k, w in plan:
                log(f"run {run + 1}/{args.runs}: {report.config_name(b, k, w)}")
                profile = args.profile.with_name(f"{args.profile.stem}-{run + 1}"
                                                 f"{args.profile.suffix}") \
                    if profiled == (b, k, w) else None
                try:
                    runs[(b, k, w)].append(run_once(args, b, k, w, overrides, Path(tmp), profile))
                except Exception as exc:  # one failed run must not lose the others
                    log(f"  FAILED: {exc}")
                    runs[(b, k, w)].append(None)
    for (b, k, w), per_run in runs.items():
        figures = report.aggregate(per_run)
        result["configs"][report.config_name(b, k, w)] = figures and {
            "broker": b, "kind": k, "workers": w, **figures, "runs": per_run}
    if profiled:
        files = sorted(args.profile.parent.glob(f"{args.profile.stem}-[0-9]*{args.profile.suffix}"))
        result["profile"] = {"config": report.config_name(*profiled),
                             "files": [str(f) for f in files], **cpu_profile.summarize(files)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = overrides_env(args.set)
    cfg = config.load(env={**os.environ, **overrides})
    weights = cfg.weights_path
    if not weights.is_file():
        sys.exit(f"bench: no weights at {weights}; train them with `fmnist train` (or pick others "
                 "with --set model.name=NAME).")
    brokers = [b for b in args.brokers.split(",") if b]
    kinds = [k for k in args.kinds.split(",") if k]
    busy = training_running()
    if busy:
        log("WARNING: `fmnist train` is running: figures measured now are not valid")
    settings = config.as_dict(cfg)
    result: dict[str, Any] = {"meta": {
        "timestamp": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), "machine": machine(),
        "libraries": common.libraries(),
        "training_running": busy, "smoke": args.smoke, "runs": args.runs, "burst": args.burst,
        "rates": args.rates, "seconds_per_rate": args.seconds, "weights": str(weights),
        "overrides": dict(a.split("=", 1) for a in args.set),
        "settings": {"serve": settings["serve"], "kafka": {
            k: v for k, v in settings["kafka"].items()
            if k in ("partitions", "linger_ms", "fetch_max_wait_ms", "compression")}},
        "command": " ".join(["benchmarks/bench.py", *(sys.argv[1:] if argv is None else argv)]),
    }, "model": {}, "configs": {}}
    started = time.monotonic()
    if not args.no_model:
        result["model"] = model_only(args, weights)
    if not args.model_only:
        ours = start_brokers(brokers, cfg)
        try:
            end_to_end(args, brokers, kinds, overrides, result)
        finally:
            for name in ours:
                subprocess.run([str(ROOT / "scripts" / "brokers"), "down", name], timeout=120)
    result["meta"]["duration_s"] = round(time.monotonic() - started, 1)
    result["meta"]["training_running"] = busy or training_running()
    result["targets"] = report.targets(result) if result["configs"] else []
    return write(args, result)


def write(args: argparse.Namespace, result: dict[str, Any]) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = result["meta"]["timestamp"] + (f"-{args.tag}" if args.tag else "") + \
        ("-smoke" if args.smoke else "")
    text = json.dumps(result, indent=1, default=float)
    (out / f"{stamp}.json").write_text(text)
    prefix = "smoke" if args.smoke else "latest"
    (out / f"{prefix}.json").write_text(text)
    md = report.markdown(result)
    (out / f"{prefix}.md").write_text(md)
    if result["configs"]:
        report.plot(result, out / f"{prefix}.png")
    print(md)
    for t in result["targets"]:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: "
              f"{'-' if t['value'] is None else round(t['value'], 3)} (limit {t['limit']}) {t['note']}")
    print(f"results: {out / (stamp + '.json')}, {out / (prefix + '.md')}")
    failed = [t for t in result["targets"] if not t["pass"]]
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # workers were stopped and topics deleted on the way out
        sys.exit(130)
