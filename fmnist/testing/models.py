"""Models for registry tests and benchmarks, made in seconds from the shipped weights: a good
second version, and the three kinds a worker must refuse (corrupt, incompatible, failing)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fmnist.jobs.protocol import who
from fmnist.model import artifacts
from fmnist.registry.protocol import VERSION_CHARS, Manifest, sha256_of

META_KEYS = ("version", "weights_file")  # artifacts.save writes these itself


def _meta(weights: Path) -> dict[str, Any]:
    return {k: v for k, v in artifacts.read_meta(weights).items() if k not in META_KEYS}


def _last_dense(model: Any) -> Any:
    return [layer for layer in model.layers if layer.get_weights()][-1]


def variant(source: Path, dest: Path, seed: int = 1, scale: float = 1e-3) -> Path:
    """``source`` with its classifier's weights nudged (relative noise ``scale``): another
    version (another SHA-256) that classifies as well."""
    model, _ = artifacts.load_model(source)
    layer = _last_dense(model)
    rng = np.random.default_rng(seed)
    layer.set_weights([w + scale * np.abs(w).mean() * rng.standard_normal(w.shape)
                       .astype(w.dtype) for w in layer.get_weights()])
    return artifacts.save(model, _meta(source), dest)


def failing_canary(source: Path, dest: Path) -> Path:
    """Loads and warms up, but answers "T-shirt/top" for every image: fails the canary."""
    model, _ = artifacts.load_model(source)
    layer = _last_dense(model)
    kernel, bias = layer.get_weights()
    layer.set_weights([np.zeros_like(kernel), np.eye(len(bias), dtype=bias.dtype)[0] * 5])
    return artifacts.save(model, _meta(source), dest)


def wrong_input(source: Path, dest: Path) -> Path:
    """A network that takes 32x32 images, with a meta.json that claims 28x28: incompatible."""
    from fmnist.runtime import keras_module

    keras = keras_module()
    model = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    return artifacts.save(model, _meta(source), dest)


def corrupt_manifest(good: Path, damaged_copy: Path) -> tuple[Manifest, Path]:
    """A manifest of ``good`` and a copy of it with bytes flipped mid-file, as a store whose
    artifact was damaged after publishing would hold them: the SHA-256 check must refuse it."""
    data = bytearray(good.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    damaged_copy.write_bytes(bytes(data))
    sha = sha256_of(good)
    meta = json.loads(artifacts.meta_path(good).read_text())
    name = meta.get("name", good.stem)
    manifest = Manifest(name=name, version=sha[:VERSION_CHARS], sha256=sha, size=len(data),
                        meta=meta, lineage={"source": str(good)}, published_at=time.time(),
                        published_by=who())
    return manifest, damaged_copy
