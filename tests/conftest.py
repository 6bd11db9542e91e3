"""Fixtures shared by unit and integration tests.

None is autouse: broker tests may be pointed at their brokers with FMNIST_* variables, so only the
tests that need a clean slate ask for one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fmnist import data

REAL_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")


GOOGLE_VARIABLES = ("PUBSUB_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No FMNIST_* variable, nor the Google variables the config honours
    (PUBSUB_EMULATOR_HOST, GOOGLE_CLOUD_PROJECT, GCLOUD_PROJECT), leaks from the caller's shell
    into the test; returns the monkeypatch."""
    for name in list(os.environ):
        if name.startswith("FMNIST_") or name in GOOGLE_VARIABLES:
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def fmnist_home(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> Path:
    """An empty project root (FMNIST_HOME) with a configs/ folder and no default.yaml."""
    home = tmp_path / "home"
    (home / "configs").mkdir(parents=True)
    clean_env.setenv("FMNIST_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Debian's copy of the four IDX .gz files; a missing package fails the test, never skips."""
    missing = [n for n in data.IDX_FILES.values() if not (REAL_DATA_DIR / f"{n}.gz").is_file()]
    assert not missing, (f"{REAL_DATA_DIR} lacks {missing}: install the Debian package "
                         "`dataset-fashion-mnist`.")
    return REAL_DATA_DIR


@pytest.fixture(scope="session")
def real_test_split(real_data_dir: Path) -> data.Split:
    """The 10k test images and labels, loaded (and verified) once per session."""
    return data.load_split("test", data.Source(real_data_dir, "idx"))

