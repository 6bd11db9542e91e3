"""A worker's checks before it serves a model from the store; any failure is a refusal.

In order, each with the stable reason that events and metrics carry:

1. ``fetch``: the store has every byte the manifest names (a broker outage is not a
   refusal: the worker tries again at its next check);
2. ``checksum``: the bytes hash to the manifest's SHA-256;
3. ``incompatible``: meta.json and the network itself take 28x28x1 pixels, name the same ten
   classes and preprocess the same way;
4. ``load``: Keras loads it and every batch shape warms up to finite probabilities;
5. ``canary``: it classifies the sample images in ``registry.canary_dir`` (their labels in
   labels.json) with at least ``registry.canary_min_correct`` right.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmnist import imaging
from fmnist.config import Config
from fmnist.errors import BrokerError, FmnistError, IncompatibleModel
from fmnist.model import artifacts
from fmnist.registry.protocol import Manifest, sha256_of
from fmnist.registry.store import Store, atomic_write

log = logging.getLogger("fmnist.registry.verify")


class Refused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass(frozen=True)
class Canary:
    files: list[str]
    pixels: np.ndarray  # [n, 28, 28] float32
    labels: np.ndarray  # [n]


def load_canary(cfg: Config) -> Canary | None:
    """The sample images and their labels, or None (with a warning) when there are none."""
    folder = cfg.registry.canary_dir
    if cfg.registry.canary_min_correct == 0:
        return None
    try:
        labels = json.loads((folder / "labels.json").read_text())
        files = sorted(labels)
        pixels = np.stack([imaging.decode((folder / f).read_bytes(), cfg.imaging) for f in files])
    except (OSError, ValueError, KeyError, FmnistError) as exc:
        log.warning("no canary: %s/labels.json and its images could not be read (%s); models "
                    "from the store are checked without one", folder, exc)
        return None
    return Canary(files, pixels.astype(np.float32),
                  np.array([int(labels[f]["label"]) for f in files]))


def cached_path(cfg: Config, manifest: Manifest) -> Path:
    """Where a worker keeps the models it fetched: beside its own weights."""
    return cfg.model.weights_dir / "registry" / f"{manifest.name}@{manifest.version}.keras"


def fetch(cfg: Config, store: Store, manifest: Manifest) -> Path:
    """The artifact on local disk with its meta.json, checked against the manifest's SHA-256;
    a copy fetched before is used again when it still checks out."""
    dest = cached_path(cfg, manifest)
    if not (dest.is_file() and sha256_of(dest) == manifest.sha256):
        try:
            store.fetch(manifest, dest)
        except BrokerError:
            raise  # the broker, not the model: try again later
        except FmnistError as exc:
            raise Refused("fetch", exc.message) from None
        actual = sha256_of(dest)
        if actual != manifest.sha256:
            dest.unlink(missing_ok=True)
            raise Refused("checksum", f"{manifest.ref}: the stored artifact hashes to "
                          f"{actual[:12]}…, not {manifest.sha256[:12]}… as its manifest says.")
    atomic_write(artifacts.meta_path(dest), json.dumps(manifest.meta, indent=2).encode())
    return dest


def load(weights: Path, make: Callable[[Path], Any], canary: Canary | None,
         min_correct: int) -> Any:
    """``make(weights)`` (a loaded, warmed Predictor) once it passes checks 3 to 5."""
    try:
        artifacts.read_meta(weights)
    except FmnistError as exc:
        raise Refused("incompatible", exc.message) from None
    try:
        predictor = make(weights)
    except IncompatibleModel as exc:
        raise Refused("incompatible", exc.message) from None
    except FmnistError as exc:
        raise Refused("load", exc.message) from None
    except Exception as exc:  # a damaged model fails in many ways; none may stop serving
        raise Refused("load", f"{type(exc).__name__}: {exc}") from None
    if canary is not None:
        predicted = np.argmax(predictor.probabilities(canary.pixels), axis=1)
        right = int(np.sum(predicted == canary.labels))
        if right < min(min_correct, len(canary.files)):
            wrong = [f for f, p, t in zip(canary.files, predicted, canary.labels, strict=True)
                     if p != t]
            raise Refused("canary", f"classified {right} of {len(canary.files)} canary images "
                          f"right, {min_correct} required (wrong: {', '.join(wrong[:5])}).")
    return predictor
