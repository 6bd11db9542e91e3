"""Shared by the benchmark's parts: per-run topics passed by env, worker processes, statistics."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


class Topics:
    """A private request/response/DLQ topic set and consumer group for one run, passed by env
    (``config.routing``, as the integration tests do) on top of the caller's FMNIST_*."""

    def __init__(self, broker: str) -> None:
        self.broker = broker
        tag = uuid.uuid4().hex[:10]
        self.request, self.response, self.dlq = f"bench-req-{tag}", f"bench-res-{tag}", \
            f"bench-req-{tag}.dlq"
        self.group = f"bench-workers-{tag}"

    def all(self) -> list[str]:
        return [self.request, self.response, self.dlq]

    def env(self, overrides: dict[str, str]) -> dict[str, str]:
        from fmnist import config

        env = dict(os.environ)  # the caller's FMNIST_* settings (bootstrap servers, ...) hold
        env.update({config.env_name(k): v for k, v in config.routing(
            self.broker, self.request, self.response, self.dlq, self.group).items()})
        env.update(PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
        env.update(overrides)
        return env

    def config(self, overrides: dict[str, str]):
        """The config a worker started with ``env(overrides)`` sees."""
        from fmnist import config

        return config.load(env=self.env(overrides))


class WorkerProcess:
    """`fmnist serve --quiet` (or the echo worker) in a subprocess, its log in a file."""

    def __init__(self, kind: str, topics: Topics, overrides: dict[str, str], log_path: Path,
                 profile: Path | None = None) -> None:
        if kind == "fmnist":
            cmd = [PYTHON, "-m", "fmnist", "serve", "--quiet"]
        else:
            cmd = [PYTHON, str(ROOT / "benchmarks" / "echo_worker.py")]
        self.kind = kind
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=topics.env(overrides), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.profiler: subprocess.Popen | None = None
        if profile is not None:
            self.profile(profile)

    def profile(self, out: Path, rate: int = 200) -> None:
        """Sample every thread of the worker with py-spy until it exits (speedscope JSON)."""
        self.profiler = subprocess.Popen(
            [py_spy(), "record", "--pid", str(self.proc.pid), "--rate", str(rate), "--format",
             "raw", "--output", str(out), "--nonblocking"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)

    def memory_mb(self) -> dict[str, float]:
        """Peak (VmHWM) and current (VmRSS) resident memory of the worker process, in MB."""
        fields: dict[str, float] = {}
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    fields[key] = int(value.split()[0]) / 1024
        except OSError:
            pass
        return fields

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM (drain and exit), then SIGKILL if it has not exited within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=10)
        if self.profiler is not None:
            try:
                self.profiler.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.profiler.kill()
                self.profiler.wait()
        self.log.close()
        return rc


def py_spy() -> str:
    for candidate in (Path(PYTHON).parent / "py-spy", Path("/tmp/pyspy/bin/py-spy")):
        if candidate.exists():
            return str(candidate)
    return "py-spy"


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, float]:
    if not values:
        return {f"p{q}_ms": None for q in qs}
    arr = np.asarray(values)
    return {f"p{q}_ms": round(float(np.percentile(arr, q)), 2) for q in qs}


def median_of(values: list[Any]) -> Any:
    """The median of per-run figures; booleans by majority; None when no run gave one."""
    present = [v for v in values if v is not None and v == v]  # drops None and NaN
    if not present:
        return None
    if all(v == present[0] and type(v) is type(present[0]) for v in present):
        return present[0]  # keeps ints ints (exit codes, counts)
    if all(isinstance(v, bool) for v in present):
        return sum(present) * 2 > len(present)
    return float(np.median(present))


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem_kb = 0
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "memory_gb": round(mem_kb / 1024**2, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def training_running() -> bool:
    """Is an `fmnist train` process running on this machine (figures would not be valid)?"""
    for status in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = status.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"fmnist") for a in args[:3]) and b"train" in args[1:4]:
            return True
    return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far; 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def listening_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1/0.0.0.0 TCP ``port`` (the broker), if we can see it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
        except OSError:
            continue
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd).removeprefix("socket:[").removesuffix("]") in inodes:
                    return int(fd_dir.parent.name)
        except OSError:
            continue
    return None


def libraries() -> dict[str, str]:
    """Versions that move the figures (librdkafka: the C library inside confluent-kafka)."""
    from importlib import metadata

    out = {}
    for name in ("tensorflow", "jax", "jaxlib", "keras", "confluent-kafka",
                 "google-cloud-pubsub", "pillow", "orjson"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    try:
        import confluent_kafka

        out["librdkafka"] = confluent_kafka.libversion()[0]
    except ImportError:
        out["librdkafka"] = "not installed"
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all cores have been busy since boot (everything but idle and iowait), so a
    phase can tell how much CPU went to processes that are not part of the benchmark."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
