"""fmnist against what users would run instead, on the same Kafka, load and weights, in one run.

    .venv/bin/python benchmarks/peers.py                    # the full run (`make bench-peers`)
    .venv/bin/python benchmarks/peers.py --rounds 1 --burst 500 --rates 50 --seconds 3  # smoke

Systems (``--systems``), each started in turn, one at a time, on a Kafka broker of this run's
own (free ports, never the shared one on 9092; ``--bootstrap`` names another), each on fresh
topics:

- ``fmnist``: `fmnist serve --quiet` with its defaults;
- ``mlserver``: Seldon MLServer in its Kafka mode (``kafka_enabled``) with a minimal runtime
  (benchmarks/peers/mlserver_runtime.py: jit-compiled forward pass, padded batches), batching
  off; ``mlserver-b64``: the same with adaptive batching, 64 requests / 2 ms;
- ``naive``: one message -> ``model.predict`` -> produce (benchmarks/peers/naive_worker.py),
  the floor;
- ``fmnist-png``: fmnist on the PNG requests of ``Images/`` (what `fmnist send` publishes);
- ``echo``, ``echo-png``: fmnist's echo worker (benchmarks/echo_worker.py) on either request,
  for the headline: fmnist's burst answers/s as a share of ``cores ÷ (model CPU per image at
  the batch fmnist served + the echo's CPU per request)`` (the model's part measured by
  benchmarks/peers/model_cpu.py after the rounds);
- with ``--baseline REF``, ``fmnist@REF`` and ``fmnist-png@REF``: fmnist as of git commit REF
  (its tree exported to the work folder, same virtualenv), so a change is measured before and
  after in one run;
- with ``--variant NAME:KEY=VALUE[,KEY=VALUE]``, ``fmnist+NAME`` and ``fmnist-png+NAME``: fmnist
  with those settings (``serve.max_wait_ms=2``), the load generator unchanged.

MLServer runs in `.venvs/mlserver`, built here when missing or off its pins (it is not a
dependency of fmnist), with keras, jax, jaxlib and numpy at constraints.txt's versions.

Every system but the ``-png`` ones gets the same request: Images/sneaker7.png as an Open
Inference Protocol [1, 28, 28] UINT8 tensor (JSON), sent by benchmarks/loadgen.py with the same
headers (fmnist's plus ``mlserver-model``). Per system and round: wait until it answers, warm
up, one saturation burst (answers/s, each process's CPU over it, and for fmnist its serve
loop's thread and its batch sizes), then open-loop latency at each ``--rates`` for
``--seconds``; a rate over 1.5 times the system's burst answers/s in that round is not offered
(it would only queue), nor any to the echoes.
Rounds alternate the order of the systems; every figure is the median of ``--rounds``. Writes
benchmarks/results/peers/<timestamp>.json (with the command) and .md, and prints the markdown
table with fmnist / peer ratios (benchmarks/peers_report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import common
import numpy as np
import venvs
from common import PYTHON, ROOT, machine, training_running
from loadgen import LoadGen, Payload
from peers_report import answer_label, headline, markdown, order, ratios, summarize

from fmnist import config, imaging
from fmnist.testing.processes import WorkerProcess
from fmnist.testing.run import OwnKafka, free_port
from fmnist.testing.topics import Topics

RESULTS = ROOT / "benchmarks" / "results" / "peers"
PEERS = ROOT / "benchmarks" / "peers"
VENV = ROOT / ".venvs" / "mlserver"
# uvloop as of MLServer 1.7.1's release: its parallel inference pool calls
# asyncio.get_event_loop() in each new worker process (mlserver/parallel/worker.py), which
# uvloop >= 0.22 turns into "RuntimeError: There is no current event loop", so the pool never
# loads a model (--mlserver-workers 1 needs this pin).
MLSERVER_PINS = ("mlserver==1.7.1", "uvloop==0.21.0")
SHARED_PINS = ("keras", "jax", "jaxlib", "numpy")  # at constraints.txt's versions
SYSTEMS = ("fmnist", "fmnist-png", "mlserver", "mlserver-b64", "naive", "echo", "echo-png")
IMAGE = "sneaker7.png"
READY_S = 180


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"of {', '.join(SYSTEMS)}")
    ap.add_argument("--rounds", type=int, default=3, help="figures are medians of the rounds")
    ap.add_argument("--burst", type=int, default=5000, help="requests in the saturation burst")
    ap.add_argument("--rates", type=floats, default=[50, 200, 500], help="offered req/s")
    ap.add_argument("--seconds", type=float, default=10.0, help="per offered rate")
    ap.add_argument("--mlserver-workers", type=int, default=0,
                    help="MLServer's parallel_workers (0: inference in the server process)")
    ap.add_argument("--bootstrap", help="use this Kafka instead of starting one of our own")
    ap.add_argument("--logs", type=Path, help="keep each system's log (and MLServer's model "
                                               "repository) here, not in a temporary folder")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tag", default="", help="added to the result file's name")
    ap.add_argument("--baseline", help="also measure fmnist as of this git commit")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="also measure fmnist with these settings; repeatable")
    args = ap.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    if unknown := [s for s in args.systems if s not in SYSTEMS]:
        ap.error(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.baseline:
        args.baseline = subprocess.run(["git", "rev-parse", "--short", args.baseline],
                                       cwd=ROOT, capture_output=True, text=True,
                                       check=True).stdout.strip()
    variants: dict[str, dict[str, str]] = {}
    for spec in args.variant:
        name, _, settings = spec.partition(":")
        try:
            variants[name] = {config.env_name(k): v for k, v in
                              (kv.split("=", 1) for kv in settings.split(",") if kv)}
        except ValueError:
            ap.error(f"--variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
    args.variants = variants
    ours = [s for s in args.systems if s.startswith("fmnist")]
    extra = {s: [f"{s}@{args.baseline}"] if args.baseline else [] for s in ours}
    for s in ours:
        extra[s] += [f"{s}+{name}" for name in variants]
    args.systems = [x for s in args.systems for x in [s, *extra.get(s, [])]]
    return args


def export_tree(ref: str, workdir: Path) -> Path:
    """The files of commit ``ref`` (weights included) in a folder of the work dir."""
    tree = workdir / f"fmnist-{ref}"
    if not tree.exists():
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


# -- the MLServer virtualenv -------------------------------------------------------------------

def pins() -> list[str]:
    constraints = dict(line.strip().split("==", 1) for line in
                       (ROOT / "constraints.txt").read_text().splitlines()
                       if "==" in line and not line.startswith("#"))
    return [*MLSERVER_PINS, *(f"{name}=={constraints[name]}" for name in SHARED_PINS)]


def ensure_venv() -> dict[str, str]:
    """.venvs/mlserver at ``pins()``; the versions that matter for the figures."""
    return venvs.ensure(VENV, pins(), log, report=["aiokafka", "fastapi", "pydantic"])


# -- the request -------------------------------------------------------------------------------

def oip_payload() -> Payload:
    """Images/sneaker7.png as the model sees it (fmnist's decode), as a [1, 28, 28] UINT8 OIP
    tensor. No ``id`` in the body: fmnist answers under the request_id header, MLServer under
    the Kafka key (its handler puts the key in the request's id), the naive worker under the
    key; all three are the load generator's request id."""
    pixels = imaging.decode((ROOT / "Images" / IMAGE).read_bytes(), config.load().imaging)
    data = np.rint(pixels).astype(np.uint8).ravel().tolist()
    body = {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "UINT8",
                        "data": data}]}
    # mlserver-model names the model an MLServer Kafka request is for (mlserver/kafka/
    # handlers.py); no mlserver-method header: 1.7.1 compares its value with an Enum, so any
    # value it is sent fails as "Invalid request method" (mlserver/kafka/server.py).
    return Payload(json.dumps(body, separators=(",", ":")).encode(), "application/json",
                   {"mlserver-model": "fmnist"}, ok_marker=b'"outputs"')


# -- starting a system -------------------------------------------------------------------------

# MLServer 1.7.1's Kafka mode, as its source says (mlserver/kafka/server.py, handlers.py) - what
# this benchmark relies on and what a reader comparing figures should know:
# - one AIOKafkaConsumer on kafka_topic_input with only bootstrap_servers set: no group_id, so
#   aiokafka joins no group, assigns itself every partition and never commits an offset, and
#   auto_offset_reset is aiokafka's "latest". A request published while no server is positioned
#   on the topic (before start-up, during a restart) is never read; one fetched but not
#   answered when the process stops is lost: at-most-once. Two servers on one topic would each
#   answer every request (no group to share partitions), so it does not scale out by adding
#   servers. No security settings reach the clients.
# - every fetched record becomes an asyncio task at once (schedule_with_callback): no bound on
#   requests in flight. A request that fails is logged; it gets no answer and no dead letter.
# - the request needs an `mlserver-model` header (`mlserver-version` optional); its Kafka key
#   replaces the body's `id`; the answer goes to kafka_topic_output with send_and_wait (one
#   broker round trip each, aiokafka's defaults: acks=1, linger_ms=0), keyed by that id, its
#   value the OIP response JSON.

def mlserver_repo(workdir: Path, topics: Topics, bootstrap: str, batch: int,
                  parallel_workers: int) -> Path:
    """A model repository folder: settings.json (the server) and fmnist/model-settings.json.
    Settings are MLServer's defaults but for the Kafka ones, free ports, folders kept out of
    the work tree, ``debug`` off and its loggers at WARNING: by default it logs a line per
    Kafka request ("Processed message of type 'infer'", mlserver/kafka/server.py), and fmnist
    runs --quiet."""
    repo = workdir / f"mlserver-{topics.request}"
    (repo / "fmnist").mkdir(parents=True)
    logging_file = repo / "logging.json"
    logging_file.write_text(json.dumps({"version": 1, "disable_existing_loggers": False,
                                        "loggers": {"mlserver": {"level": "WARNING"},
                                                    "uvicorn": {"level": "WARNING"}}}))
    settings = {"debug": False, "parallel_workers": parallel_workers,
                "kafka_enabled": True, "kafka_servers": bootstrap,
                "kafka_topic_input": topics.request, "kafka_topic_output": topics.response,
                "http_port": free_port(), "grpc_port": free_port(),
                "metrics_port": free_port(), "metrics_dir": str(repo / "metrics"),
                "environments_dir": str(repo / "envs"), "logging_settings": str(logging_file)}
    model = {"name": "fmnist", "implementation": "mlserver_runtime.FmnistRuntime",
             "parameters": {"uri": str(ROOT / "weights" / "fmnist.keras")},
             "max_batch_size": batch, "max_batch_time": 0.002 if batch > 1 else 0.0}
    (repo / "settings.json").write_text(json.dumps(settings, indent=1))
    (repo / "fmnist" / "model-settings.json").write_text(json.dumps(model, indent=1))
    return repo


def start(system: str, topics: Topics, bootstrap: str, workdir: Path,
          args: argparse.Namespace, metrics_port: int) -> WorkerProcess:
    log_path = workdir / f"{system.replace('@', '-')}-{topics.request}.log"
    servers = {"FMNIST_KAFKA__BOOTSTRAP_SERVERS": bootstrap}
    name, _, ref = system.partition("@")
    name, _, variant = name.partition("+")
    if name.startswith("fmnist"):
        env = {**servers, "FMNIST_SERVE__METRICS_PORT": str(metrics_port),
               **args.variants.get(variant, {})}
        if not ref:
            return WorkerProcess(topics, log_path, env=env, inherit=True)
        # -P: not the work tree's fmnist (python -m puts the current folder first), but REF's
        tree = export_tree(ref, workdir)
        return WorkerProcess(topics, log_path, env={**env, "PYTHONPATH": str(tree)},
                             inherit=True, command=[PYTHON, "-P", "-m", "fmnist", "serve",
                                                    "--quiet"])
    if name.startswith("echo"):
        return common.WorkerProcess("echo", topics, servers, log_path)
    if system == "naive":
        return WorkerProcess(topics, log_path, command=[
            PYTHON, str(PEERS / "naive_worker.py"), bootstrap, topics.request, topics.response,
            topics.group, str(ROOT / "weights" / "fmnist.keras")], env=servers)
    repo = mlserver_repo(workdir, topics, bootstrap, 64 if system == "mlserver-b64" else 0,
                         args.mlserver_workers)
    return WorkerProcess(topics, log_path, command=[str(VENV / "bin" / "mlserver"), "start",
                                                    str(repo)],
                         env={"KERAS_BACKEND": "jax", "PYTHONPATH": str(PEERS)})


def stop(proc: WorkerProcess) -> int:
    """SIGTERM (each system drains or closes on it), then whatever is left of the process
    group it was started in (MLServer's parallel workers) is killed."""
    rc = proc.stop(timeout=30)
    try:
        os.killpg(proc.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return rc


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (MLServer's inference pool runs in child processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in children.read_text().split()]
            except OSError:
                continue
    return out


def rss_peak_mb(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return round(total, 1)


# -- one round of one system -------------------------------------------------------------------

def ready(gen: LoadGen, proc: WorkerProcess, timeout_s: float) -> float:
    """Seconds from process start to its first answer. One request a second until one is
    answered: MLServer's consumer has no group and starts at the log's end, so a request
    published before it is positioned is never answered."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"exited with {proc.proc.returncode}:\n{proc.output()[-3000:]}")
        rid = gen.send(1)
        if gen.wait_for(rid, 1.0):
            return gen.answers[rid[0]].received_at - proc.started
    raise RuntimeError(f"no answer within {timeout_s:.0f} s:\n{proc.output()[-3000:]}")


def batch_totals(port: int) -> tuple[float, float] | None:
    """(requests, batches) a worker has answered, from its /metrics (fmnist_batch_size)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    found = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for part in found:
            if line.startswith(f"fmnist_batch_size_{part}"):
                found[part] += float(line.rsplit(" ", 1)[1])
    return found["sum"], found["count"]


def measure(system: str, args: argparse.Namespace, bootstrap: str, broker_pid: int | None,
            workdir: Path) -> dict[str, Any]:
    topics = Topics("kafka", prefix="peers-")
    overrides = {"FMNIST_KAFKA__BOOTSTRAP_SERVERS": bootstrap}
    png = system.partition("@")[0].partition("+")[0].endswith("-png")
    gen = LoadGen("kafka", topics, overrides, None if png else oip_payload())
    proc = None
    result: dict[str, Any] = {}
    metrics_port = free_port()
    try:
        proc = start(system, topics, bootstrap, workdir, args, metrics_port)
        result["ready_s"] = ready(gen, proc, READY_S)
        gen.burst(min(200, args.burst), 120)  # warm every path; not measured
        pids = {"server": tree(proc.proc.pid), "broker": [broker_pid] if broker_pid else [],
                "loadgen": [os.getpid()]}
        fmnist = system.startswith("fmnist")
        threads, batches = common.thread_cpu_seconds(proc.proc.pid), batch_totals(metrics_port)
        before, wall, began = cpu(pids), time.monotonic(), time.time()
        # the echo's burst is 4x as long: at ~15,000 answers/s the usual one lasts a third of a
        # second, too short for CPU figures counted in 10 ms ticks
        count = args.burst * (4 if system.startswith("echo") else 1)
        result["burst"] = sat = gen.burst(count, 120 + count / 20)
        after, wall = cpu(pids), time.monotonic() - wall
        if fmnist:  # the serve loop's own thread, and the batches it formed
            used = common.thread_cpu_seconds(proc.proc.pid)
            sat["thread_us_per_answer"] = {
                k: round(1e6 * (v - threads.get(k, 0.0)) / max(1, sat["answered"]), 1)
                for k, v in sorted(used.items(), key=lambda kv: -kv[1])}
            if batches and (later := batch_totals(metrics_port)) and later[1] > batches[1]:
                sat["batch_mean"] = (later[0] - batches[0]) / (later[1] - batches[1])
        # every earlier answer arrived before the burst began (each phase waits for its own)
        sat["first_answer_s"] = min((m.received_at for m in list(gen.answers.values())
                                     if m.received_at >= began), default=began) - began
        result["labels"] = sorted({answer_label(m.value) for m in list(gen.answers.values())},
                                  key=str)
        answered = max(1, sat["answered"])
        sat["cpu_ms_per_answer"] = {k: 1000 * (after[k] - before[k]) / answered for k in pids}
        busy = {k: (after[k] - before[k]) / wall for k in [*pids, "machine"]}
        sat["cpu_cores_busy"] = {**{k: busy[k] for k in pids},
                                 "other": max(0.0, busy["machine"] - sum(busy[k] for k in pids))}
        # A rate over a system's capacity is measured too: its queue grows for --seconds and
        # drains after (the figures say "not sustained"); rates run lowest first.
        capacity = sat.get("answered_per_s") or 0.0
        result["rates"] = {f"{rate:g}": gen.paced(rate, args.seconds)
                           for rate in sorted(args.rates)
                           if not system.startswith("echo") and rate <= 1.5 * capacity}
        result["rss_peak_mb"] = rss_peak_mb(tree(proc.proc.pid))
        result["duplicates"] = gen.duplicates
    finally:
        if proc is not None:
            result["exit_code"] = stop(proc)
        gen.close()
    return result


def warm_broker(bootstrap: str, workdir: Path, count: int) -> None:
    """Two bursts through fmnist's echo worker (benchmarks/echo_worker.py) before anything is
    measured, so that the broker's JVM has compiled its produce and fetch paths: otherwise the
    first system of the first round pays for it (the broker used ~0.9 cores in that burst
    against 0.1-0.2 in every later one)."""
    topics = Topics("kafka", prefix="peers-")
    overrides = {"FMNIST_KAFKA__BOOTSTRAP_SERVERS": bootstrap}
    gen = LoadGen("kafka", topics, overrides, oip_payload())
    echo = common.WorkerProcess("echo", topics, overrides, workdir / "broker-warm-up.log")
    try:
        ready(gen, echo, READY_S)
        for _ in range(2):
            gen.burst(count, 120)
    finally:
        echo.stop()
        gen.close()


def cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    return {**{k: sum(common.cpu_seconds(p) for p in v) for k, v in pids.items()},
            "machine": common.machine_busy_seconds()}


def model_cpu(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The forward pass's CPU per image at the batch each of ours served in its burst
    (benchmarks/peers/model_cpu.py, on an otherwise idle machine, after the rounds)."""
    served = {s: round(b) for s in ("fmnist", "fmnist-png")
              if (b := (summary.get(s) or {}).get("burst", {}).get("batch_mean"))}
    if not served:
        return {}
    log(f"model CPU per image at batch {sorted(set(served.values()))}")
    done = subprocess.run([PYTHON, str(PEERS / "model_cpu.py"),
                           *map(str, sorted(set(served.values())))],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    if done.returncode != 0:
        log(f"  FAILED: {done.stderr[-2000:]}")
        return {}
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {s: {"batch": b, **figures[str(b)]} for s, b in served.items()}


# -- main --------------------------------------------------------------------------------------

def kafka_version() -> str:
    pom = (ROOT / "scripts" / "kafka" / "pom.xml").read_text()
    return pom.split("<kafka.version>", 1)[1].split("<", 1)[0]


def own_kafka(workdir: Path) -> OwnKafka:
    kafka = OwnKafka(workdir / "kafka-state")
    kafka.up()
    return kafka


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (ROOT / "weights" / "fmnist.keras").is_file():
        sys.exit("peers: no weights/fmnist.keras; train them with `fmnist train`.")
    versions = ensure_venv() if any(s.startswith("mlserver") for s in args.systems) else {}
    busy = training_running()
    if busy:
        log("WARNING: `fmnist train` is running: figures measured now are not valid")
    settings = config.as_dict(config.load())
    result: dict[str, Any] = {"meta": {
        "timestamp": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), "machine": machine(),
        "libraries": common.libraries(), "mlserver_venv": versions,
        "command": " ".join(["benchmarks/peers.py", *(sys.argv[1:] if argv is None else argv)]),
        "systems": args.systems, "rounds": args.rounds, "burst": args.burst,
        "rates": args.rates, "seconds_per_rate": args.seconds,
        "mlserver_parallel_workers": args.mlserver_workers, "variants": args.variants,
        "request": f"Images/{IMAGE} as an OIP [1,28,28] UINT8 tensor (JSON)",
        "broker": args.bootstrap or f"own Kafka {kafka_version()}, one KRaft node",
        "fmnist_settings": {"serve": settings["serve"], "kafka": {
            k: v for k, v in settings["kafka"].items()
            if k in ("partitions", "linger_ms", "fetch_max_wait_ms", "compression")}},
        "training_running": busy, "order": []}}
    rounds: dict[str, list[dict[str, Any] | None]] = {s: [] for s in args.systems}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fmnist-peers-") as tmp:
        workdir = args.logs or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        kafka = None if args.bootstrap else own_kafka(workdir)
        bootstrap = args.bootstrap or kafka.address
        broker_pid = common.listening_pid(int(bootstrap.rsplit(":", 1)[1]))
        try:
            log("warming the broker up")
            warm_broker(bootstrap, workdir, args.burst)
            for r in range(args.rounds):
                result["meta"]["order"].append(order(args.systems, r))
                for system in order(args.systems, r):
                    log(f"round {r + 1}/{args.rounds}: {system}")
                    try:
                        rounds[system].append(measure(system, args, bootstrap, broker_pid,
                                                      workdir))
                    except Exception as exc:  # one failed round must not lose the others
                        log(f"  FAILED: {exc}")
                        rounds[system].append(None)
        finally:
            if kafka is not None:
                kafka.down()
    result["meta"]["duration_s"] = round(time.monotonic() - started, 1)
    result["meta"]["training_running"] = busy or training_running()
    result["summary"] = summarize(rounds)
    result["ratios"] = ratios(result["summary"], args.rates)
    result["model_cpu"] = model_cpu(result["summary"])
    result["headline"] = headline(result["summary"], {
        s: result["model_cpu"][s]["cpu_us_per_image"] for s in result["model_cpu"]},
        os.cpu_count() or 1)
    result["rounds"] = rounds
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{result['meta']['timestamp']}{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(result, indent=1, default=float))
    table = markdown(result)
    path.with_suffix(".md").write_text(f"{result['meta']['command']}\n\n{table}\n")
    print(table)
    print(f"\nresults: {path}, {path.with_suffix('.md').name}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # processes were stopped and topics deleted on the way out
        sys.exit(130)
