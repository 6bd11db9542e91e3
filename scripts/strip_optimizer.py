"""Re-save shipped Keras weights without the optimizer, and bring their meta.json up to date.

`model.save` after training also writes the optimizer into the .keras archive: AdamW's two
moment estimates per weight (twice the weights' own size) and its compile config. Serving and
distillation only read the architecture and the weights, so the shipped files leave it out.

For each archive that still holds an optimizer: load it uncompiled, save it to a temporary file
beside it, check that every weight came through bit for bit, replace the original, then update
the fields of its meta.json that describe the file (`version`, the first 12 hex digits of its
SHA-256; `weights_file`; the Keras version that wrote it). An archive without an optimizer is
left alone, so running this again changes nothing.

    .venv/bin/python scripts/strip_optimizer.py [weights/NAME.keras ...]   (default: weights/*.keras)
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import h5py
import numpy as np

from fmnist.model.artifacts import file_version, meta_path, read_meta

WEIGHTS_ENTRY = "model.weights.h5"


def h5_datasets(archive: Path) -> dict[str, np.ndarray]:
    """Every array in the archive's weights file, by its path inside the HDF5 file."""
    with zipfile.ZipFile(archive) as zipped:
        raw = zipped.read(WEIGHTS_ENTRY)
    found: dict[str, np.ndarray] = {}
    with h5py.File(io.BytesIO(raw), "r") as h5:
        h5.visititems(lambda name, obj: found.__setitem__(name, obj[()])
                      if isinstance(obj, h5py.Dataset) else None)
    return found


def optimizer_entries(archive: Path) -> list[str]:
    """What in the archive belongs to the optimizer: its variables and the compile config."""
    with zipfile.ZipFile(archive) as zipped:
        config = json.loads(zipped.read("config.json"))
    entries = [name for name in h5_datasets(archive) if name.startswith("optimizer/")]
    # an uncompiled model's config carries an empty compile_config
    return entries + (["config.json: compile_config"] if config.get("compile_config") else [])


def resave_without_optimizer(archive: Path) -> None:
    import keras

    model = keras.saving.load_model(archive, compile=False)
    fd, tmp_name = tempfile.mkstemp(dir=archive.parent, suffix=".keras")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        model.save(tmp)
        before, after = h5_datasets(archive), h5_datasets(tmp)
        kept = {name: array for name, array in before.items() if not name.startswith("optimizer/")}
        if kept.keys() != after.keys() or any(
                kept[name].dtype != after[name].dtype or not np.array_equal(kept[name], after[name])
                for name in kept):
            raise SystemExit(f"{archive}: the re-saved weights differ from the original; "
                             "nothing was replaced.")
        if optimizer_entries(tmp):
            raise SystemExit(f"{archive}: Keras saved the optimizer again; nothing was replaced.")
        os.chmod(tmp, 0o644)
        os.replace(tmp, archive)
    finally:
        tmp.unlink(missing_ok=True)


def update_meta(archive: Path) -> None:
    import keras

    meta = read_meta(archive)
    meta["version"] = file_version(archive)
    meta["weights_file"] = archive.name
    meta.setdefault("versions", {})["keras"] = keras.__version__
    meta_path(archive).write_text(json.dumps(meta, indent=2) + "\n")


def strip(archive: Path) -> None:
    entries = optimizer_entries(archive)
    if not entries:
        print(f"{archive}: no optimizer; left alone ({archive.stat().st_size} bytes).")
        return
    read_meta(archive)  # refuse weights whose meta.json this code would not load
    size = archive.stat().st_size
    resave_without_optimizer(archive)
    update_meta(archive)
    print(f"{archive}: dropped {len(entries)} optimizer entries; {size} -> "
          f"{archive.stat().st_size} bytes; version {file_version(archive)}.")


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # the backend the weights were trained on
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    root = Path(__file__).resolve().parent.parent
    for path in [Path(arg) for arg in sys.argv[1:]] or sorted((root / "weights").glob("*.keras")):
        strip(path)
