"""`fmnist serve` (or another worker script) in a subprocess on a run's topics, its log in a
file."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fmnist.config import project_root
from fmnist.testing.topics import Topics

ROOT = project_root()
FMNIST = [sys.executable, "-m", "fmnist"]


class WorkerProcess:
    """Started at once; ``stop`` drains it with SIGTERM, then kills it if it does not exit."""

    def __init__(self, topics: Topics, log_path: Path, *args: str,
                 command: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                 inherit: bool = False) -> None:
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.started = time.time()
        cmd = [*(command or [*FMNIST, "serve", "--quiet"]), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=topics.env(env, inherit),
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def memory_mb(self) -> dict[str, float]:
        """Peak (VmHWM) and current (VmRSS) resident memory of the process, in MB."""
        fields: dict[str, float] = {}
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    fields[key] = int(value.split()[0]) / 1024
        except OSError:
            pass
        return fields

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (drain and exit), then SIGKILL if it has not exited within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=10)
        self.log.close()
        return rc

    def kill(self) -> None:
        """At once, no draining (a test's clean-up)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()
