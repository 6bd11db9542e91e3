"""Which install a command needs, and a clear error when this one lacks it.

``pip install fmnist`` (or ``-e .``) gives the whole tool. Two smaller sets leave the heavy
packages out (docs/install.md): ``requirements/client.txt`` (send, listen, jobs; no Keras, JAX
or TensorFlow) and ``requirements/serve.txt`` (serving on JAX, no TensorFlow or matplotlib).
A command that needs what the install left out says so before it starts work, instead of
failing with a traceback after an epoch of training (docs/decisions.md#install-sets).
"""

from __future__ import annotations

import importlib.util

from fmnist.errors import FmnistError

# The packages each kind of work imports, by import name, with the set that provides them.
INFERENCE = ("keras", "jax")                  # requirements/serve.txt
PLOTS = ("matplotlib",)                       # the whole tool only
# import name -> the name pip installs it by
DISTRIBUTIONS = {"keras": "keras", "jax": "jax[cpu]", "matplotlib": "matplotlib",
                 "tensorflow": "tensorflow", "prometheus_client": "prometheus-client"}


class MissingPackage(FmnistError):
    """A command needs a package this install leaves out (a client or serving install)."""

    exit_code = 2


def missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(what: str, *modules: str) -> None:
    """Raise MissingPackage naming what ``what`` needs when any of ``modules`` is absent."""
    if absent := missing(*modules):
        raise missing_package(what, absent)


def missing_package(what: str, absent: list[str]) -> MissingPackage:
    packages = [DISTRIBUTIONS.get(m, m) for m in absent]
    names = ", ".join(packages[:-1]) + " and " + packages[-1] if len(packages) > 1 else packages[0]
    return MissingPackage(
        f"{what} needs {names}, which this install leaves out (a client or serving install, "
        "docs/install.md).",
        f"Install the whole tool: pip install -c constraints.txt -e . (or pip install "
        f"{' '.join(repr(p) for p in packages)}).")


def from_import_error(what: str, exc: ModuleNotFoundError) -> MissingPackage | None:
    """The clear error for an import that failed because the install left a package out;
    None for any other missing module (a real bug, which keeps its traceback)."""
    top = (exc.name or "").split(".")[0]
    return missing_package(what, [top]) if top in DISTRIBUTIONS else None
