"""The layering docs/architecture.md promises, checked on the source: arrows point one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "fmnist"
# package (or module) -> fmnist packages it must never import
FORBIDDEN = {
    "model": ("serving", "brokers", "client", "testing", "cli", "jobs", "registry", "feedback"),
    "imaging": ("serving", "brokers", "model", "client", "testing", "cli", "registry"),
    "brokers": ("serving", "model", "imaging", "client", "testing", "cli", "registry"),
    "serving": ("client", "testing", "cli", "jobs"),
    "client": ("testing", "cli", "model"),
    "jobs": ("testing", "cli", "client"),
    # registry/commands.py is the `fmnist models` group, so the registry may import the cli
    "registry": ("testing", "client", "serving"),
    "data": ("serving", "brokers", "model", "imaging", "client", "testing", "cli"),
}
VENDOR_CLIENTS = ("confluent_kafka", "google.cloud.pubsub", "google.pubsub_v1")


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def sources(unit: str) -> list[Path]:
    folder = PACKAGE / unit
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [PACKAGE / f"{unit}.py"]


@pytest.mark.parametrize("unit", sorted(FORBIDDEN))
def test_no_arrow_runs_back_up(unit: str) -> None:
    wrong = [f"{path.relative_to(PACKAGE)} imports {name}"
             for path in sources(unit) for name in sorted(imports_of(path))
             for banned in FORBIDDEN[unit]
             if name == f"fmnist.{banned}" or name.startswith(f"fmnist.{banned}.")]
    assert not wrong


def test_vendor_clients_are_imported_only_in_their_adapter() -> None:
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        for name in imports_of(path):
            vendor = next((v for v in VENDOR_CLIENTS if name == v or name.startswith(v + ".")),
                          None)
            allowed = ("brokers/kafka/" if vendor == "confluent_kafka" else "brokers/pubsub/")
            if vendor and not rel.startswith(allowed):
                wrong.append(f"{rel} imports {name}")
    assert not wrong


def test_the_product_never_imports_the_test_harness() -> None:
    wrong = [f"{path.relative_to(PACKAGE)}" for path in PACKAGE.rglob("*.py")
             if "testing" not in path.relative_to(PACKAGE).parts
             and any(n == "fmnist.testing" or n.startswith("fmnist.testing.")
                     for n in imports_of(path))]
    assert not wrong


def test_brokers_base_holds_only_types() -> None:
    assert not [n for n in imports_of(PACKAGE / "brokers" / "base.py") if n.startswith("fmnist")]
