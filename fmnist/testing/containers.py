"""The fmnist images (Dockerfile), built with scripts/images and run with podman, for the tests
that run a worker the way users run it in a container."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from fmnist.testing.processes import ROOT

CONTAINERS_CONF = ROOT / "deploy" / "podman" / "containers.conf"
VERSION = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]  # type: ignore[index]


def env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}


def can_build() -> str | None:
    """None when scripts/images can build here (podman is installed, or it may install it:
    root with apt-get); else why not."""
    if shutil.which("podman") or (os.geteuid() == 0 and shutil.which("apt-get")):
        return None
    return "needs podman (Debian/Ubuntu: sudo apt-get install podman runc debootstrap)"


@functools.cache  # once per test session: later calls only bring the tag back
def build(target: str) -> str:
    """Build (or bring up to date) an image with scripts/images (serve, train or prometheus);
    its tag."""
    done = subprocess.run([str(ROOT / "scripts" / "images"), target], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"scripts/images {target} failed:\n{done.stdout}\n{done.stderr}"
    return f"localhost/fmnist-{target}:{'debian' if target == 'prometheus' else VERSION}"


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], env=env(), capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert done.returncode == 0, f"podman {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def host_address() -> str:
    """This machine's own address, which containers on a bridge network reach it by (the
    interface of its default route; no packet is sent)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("198.51.100.1", 9))  # TEST-NET-2: never answered
        return str(probe.getsockname()[0])


def inspect_image(tag: str) -> dict[str, Any]:
    return json.loads(podman("image", "inspect", tag).stdout)[0]  # type: ignore[no-any-return]


class Container:
    """``podman run -d`` of an image on the host's network (so it reaches the host's brokers at
    the addresses the default config names), locked down as deploy/k8s runs it: read-only root
    filesystem, no capabilities, no privilege escalation."""

    def __init__(self, image: str, name: str, settings: Mapping[str, str],
                 command: Sequence[str] = ()) -> None:
        self.name = name
        flags = [f"--env={k}={v}" for k, v in settings.items()]
        podman("run", "-d", "--name", name, "--network", "host", "--read-only",
               "--cap-drop", "ALL", "--security-opt", "no-new-privileges", *flags, image,
               *command)

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def state(self) -> dict[str, Any]:
        return json.loads(podman("inspect", self.name).stdout)[0]["State"]  # type: ignore[no-any-return]

    def healthy(self) -> bool:
        """The image's HEALTHCHECK, run now (podman schedules it with systemd timers, which a
        host without systemd lacks)."""
        return podman("healthcheck", "run", self.name, check=False).returncode == 0

    def stop(self, timeout: int = 45) -> int:
        """SIGTERM (the image's STOPSIGNAL), SIGKILL after ``timeout`` s; the exit code."""
        podman("stop", "-t", str(timeout), self.name, timeout=timeout + 30)
        return int(self.state()["ExitCode"])

    def remove(self) -> None:
        podman("rm", "-f", "-v", self.name, check=False)
