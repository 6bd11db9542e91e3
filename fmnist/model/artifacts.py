"""Weights and their meta.json sidecar: written together, checked together.

Weights never load without a meta.json that matches what this code expects (format version,
input shape, class names, preprocessing), so a stale or foreign file is refused with a message
instead of producing confident nonsense.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from fmnist.data import CLASS_NAMES
from fmnist.errors import IncompatibleModel, ModelError
from fmnist.model.network import INPUT_SHAPE, PREPROCESSING

META_FORMAT = 1
TRAIN_HINT = "Train one with `fmnist train`, or point `model.weights_dir` / `model.name` at one."


def meta_path(weights: Path) -> Path:
    return weights.with_suffix(".meta.json")


def file_version(path: Path) -> str:
    """The model version every response names: the first 12 hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def make_meta(**fields: Any) -> dict[str, Any]:
    return {
        "format": META_FORMAT,
        "class_names": list(CLASS_NAMES),
        "input": {"shape": list(INPUT_SHAPE), "dtype": "float32", "range": [0, 255]},
        "preprocessing": PREPROCESSING,
        **fields,
    }


def _atomic_write(path: Path, write: Any, suffix: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; weights are meant to be shared and served
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _without_optimizer(model: Any) -> Any:
    """The same architecture and weights, uncompiled: serving and distillation never read the
    optimizer, whose moment estimates would make the file three times as large."""
    if getattr(model, "optimizer", None) is None:
        return model
    lean = type(model).from_config(model.get_config())  # no compile config: no optimizer
    lean.set_weights(model.get_weights())
    return lean


def save(model: Any, meta: dict[str, Any], path: Path) -> Path:
    """Write weights then meta, each atomically, so a reader never sees a half-written pair."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, _without_optimizer(model).save, ".keras")
    meta = {**meta, "version": file_version(path), "weights_file": path.name}
    _atomic_write(meta_path(path),
                  lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"), ".json")
    return path


def read_meta(weights: Path) -> dict[str, Any]:
    """Check that weights and a compatible meta.json exist; return the meta."""
    if not weights.is_file():
        raise ModelError(f"No model weights at {weights}.", TRAIN_HINT)
    sidecar = meta_path(weights)
    try:
        meta = json.loads(sidecar.read_text())
    except FileNotFoundError:
        raise ModelError(f"{weights} has no {sidecar.name} beside it, so its input and classes "
                         "cannot be checked.", TRAIN_HINT) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{sidecar} is not valid JSON ({exc}).", TRAIN_HINT) from None
    problems = []
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        problems.append(f"meta format {meta.get('format') if isinstance(meta, dict) else '?'} "
                        f"(this code reads {META_FORMAT})")
    else:
        if meta.get("class_names") != list(CLASS_NAMES):
            problems.append("class names differ")
        if meta.get("input", {}).get("shape") != list(INPUT_SHAPE):
            problems.append(f"input shape {meta.get('input', {}).get('shape')}")
        if meta.get("preprocessing") != PREPROCESSING:
            problems.append("preprocessing rule differs")
    if problems:
        raise IncompatibleModel(f"{weights} is incompatible with this version of fmnist: "
                         f"{'; '.join(problems)}.",
                         "Retrain with `fmnist train`, or use the fmnist version that made it.")
    return meta


def load_model(weights: Path) -> tuple[Any, dict[str, Any]]:
    """The Keras model and its meta; the meta's version is recomputed from the file on disk."""
    meta = read_meta(weights)
    from fmnist.runtime import keras_module

    keras = keras_module()
    try:
        with zipfile.ZipFile(weights) as archive:
            architecture = json.loads(archive.read("config.json"))
        model = keras.saving.deserialize_keras_object(_zero_initialised(architecture))
        model.load_weights(weights)
    except Exception as exc:  # Keras and zipfile raise many types for a damaged archive
        raise ModelError(f"{weights} could not be loaded: {exc}", TRAIN_HINT) from None
    shape = tuple(getattr(model, "input_shape", (None, *INPUT_SHAPE))[1:])
    if shape != tuple(INPUT_SHAPE):  # a meta.json can claim what the network does not take
        raise IncompatibleModel(f"{weights} takes input {shape}, not {tuple(INPUT_SHAPE)} "
                                "as its meta.json says.", TRAIN_HINT)
    return model, {**meta, "version": file_version(weights)}


def _zero_initialised(config: Any) -> Any:
    """The architecture with every initializer set to zeros: the file supplies every value,
    and random initialisers would only make JAX compile its random-number kernels for each
    variable shape - 3.5 s of a first start on this CPU, against 0.8 s this way."""
    if isinstance(config, dict):
        return {key: ({"module": "keras.initializers", "class_name": "Zeros", "config": {},
                       "registered_name": None}
                      if key.endswith("_initializer") and isinstance(value, dict)
                      else _zero_initialised(value))
                for key, value in config.items()}
    if isinstance(config, list):
        return [_zero_initialised(value) for value in config]
    return config
