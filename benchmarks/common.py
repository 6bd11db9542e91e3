"""Shared by the benchmark's parts: worker processes on per-run topics (fmnist.testing's, as the
tests use them), the machine's state, statistics."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fmnist.testing.processes import ROOT
from fmnist.testing.processes import WorkerProcess as HarnessProcess
from fmnist.testing.topics import Topics

PYTHON = sys.executable

ECHO_WORKER = [PYTHON, str(ROOT / "benchmarks" / "echo_worker.py")]


def bench_topics(broker: str) -> Topics:
    """A run's own topics and group (``bench-`` names, so a leftover one is easy to spot)."""
    return Topics(broker, prefix="bench-")


class WorkerProcess(HarnessProcess):
    """`fmnist serve --quiet` (``kind`` "fmnist") or the echo worker, on a run's topics, with
    the caller's own FMNIST_* settings under ``overrides``; optionally sampled by py-spy."""

    def __init__(self, kind: str, topics: Topics, overrides: dict[str, str],
                 log_path: Path) -> None:
        super().__init__(topics, log_path, command=None if kind == "fmnist" else ECHO_WORKER,
                         env=overrides, inherit=True)
        self.kind = kind
        self.profiler: subprocess.Popen[bytes] | None = None

    def profile(self, out: Path, rate: int = 200) -> None:
        """Sample every thread of the worker with py-spy until it exits (speedscope JSON)."""
        self.profiler = subprocess.Popen(
            [py_spy(), "record", "--pid", str(self.proc.pid), "--rate", str(rate), "--format",
             "raw", "--output", str(out), "--nonblocking"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)

    def stop(self, timeout: float = 20) -> int:
        rc = super().stop(timeout)
        if self.profiler is not None:
            try:
                self.profiler.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.profiler.kill()
                self.profiler.wait()
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


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds by thread of a process: ``main`` for its first thread (a worker's serve loop:
    all of fmnist's Python), the others summed by name with their numbers dropped
    (``rdk:broker1`` and ``rdk:broker2`` are ``rdk:broker``)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = "main" if task.name == str(pid) else \
            stat[stat.index("(") + 1:stat.rindex(")")].rstrip("0123456789-_") or "?"
        fields = stat.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf(
            "SC_CLK_TCK")
    return out


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
