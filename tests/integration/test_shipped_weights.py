"""The shipped weights: only what serving needs, and exactly as accurate as their meta.json says.

After re-saving an archive (scripts/strip_optimizer.py) or replacing one, these say whether the
file still holds optimizer state and whether it still scores what was recorded at training.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from fmnist.model.predictor import Predictor
from fmnist.testing.processes import ROOT

pytestmark = pytest.mark.slow
SHIPPED = [ROOT / "weights" / "fmnist.keras", ROOT / "weights" / "fmnist-full.keras"]


def optimizer_entries(archive: Path) -> list[str]:
    """The optimizer's variables in the archive's weights file, and its compile config."""
    with zipfile.ZipFile(archive) as zipped:
        config = json.loads(zipped.read("config.json"))
        raw = zipped.read("model.weights.h5")
    names: list[str] = []
    with h5py.File(io.BytesIO(raw), "r") as h5:
        h5.visit(names.append)
    found = [name for name in names if "optimizer" in name.split("/")[0]]
    return found + (["config.json: compile_config"] if config.get("compile_config") else [])


def recorded(archive: Path) -> dict:
    return json.loads(archive.with_suffix(".meta.json").read_text())


def accuracy_now(archive: Path, split) -> float:
    """Top-1 accuracy on the test split through the serving Predictor, as `fmnist evaluate`."""
    probabilities = Predictor(archive, max_batch=512).probabilities(split.images)
    return float(np.mean(probabilities.argmax(axis=1) == split.labels))


@pytest.mark.parametrize("archive", SHIPPED, ids=lambda path: path.stem)
def test_shipped_weights_hold_no_optimizer_state(archive: Path) -> None:
    assert optimizer_entries(archive) == [], (
        f"{archive.name} still carries optimizer state; run "
        "`.venv/bin/python scripts/strip_optimizer.py` to re-save it without.")


@pytest.mark.parametrize("archive", SHIPPED, ids=lambda path: path.stem)
def test_shipped_weights_score_the_accuracy_their_meta_records(archive: Path,
                                                                real_test_split) -> None:
    meta = recorded(archive)
    assert meta["version"] == hashlib.sha256(archive.read_bytes()).hexdigest()[:12], (
        "meta.json's version is not this file's SHA-256 prefix")
    assert meta["weights_file"] == archive.name
    # Training records float(np.mean(correct)) over the 10k test images: a whole number of
    # images, so the recorded value is exact and the comparison can be too.
    assert accuracy_now(archive, real_test_split) == meta["metrics"]["test_accuracy"]
