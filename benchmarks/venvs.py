"""The benchmarks' own virtualenvs under .venvs/ (MLServer, ONNX Runtime): software fmnist does
not depend on, built where a benchmark needs it and brought to its pins only when they differ.
Standard library only, so a script running inside one of those virtualenvs may import it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

VERSIONS = """
import json, sys
from importlib import metadata
found = {}
for name in sys.argv[1:]:
    try:
        found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
print(json.dumps(found))
"""


def installed(python: Path, names: list[str]) -> dict[str, str]:
    """The versions of ``names`` installed for ``python`` (those that are)."""
    if not python.exists():
        return {}
    done = subprocess.run([str(python), "-c", VERSIONS, *names], capture_output=True, text=True,
                          timeout=120)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def ensure(venv: Path, pins: list[str], log: Callable[[str], None],
           report: list[str] | None = None) -> dict[str, str]:
    """``venv`` with ``pins`` ("name==version") installed; made or brought to the pins only
    when they differ. Returns the installed versions of the pinned packages and of ``report``."""
    python = venv / "bin" / "python"
    wanted = dict(p.split("==", 1) for p in pins)
    if installed(python, list(wanted)) != wanted:
        log(f"installing {', '.join(pins)} into {venv}")
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
            subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"],
                           check=True, timeout=600)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True,
                       timeout=1800)
    return installed(python, [*wanted, *(report or [])])
