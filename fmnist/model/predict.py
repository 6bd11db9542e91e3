"""`fmnist predict`: classify local files with the same decode and forward pass as the worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fmnist import imaging
from fmnist.config import Config
from fmnist.errors import ImageError


def read_and_decode(name: str, cfg: Config) -> np.ndarray:
    path = Path(name)
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise ImageError("unreadable_file", f"cannot read {name}: {exc.strerror or exc}",
                         "Check the path and the file's permissions.") from None
    return imaging.decode(payload, cfg.imaging)


def predict_files(cfg: Config, names: list[str]) -> list[dict[str, Any]]:
    """One result per file, in order: a prediction, or an ``error`` with code and message.

    Every readable file is classified even when others fail; the CLI exits non-zero if any did.
    """
    from fmnist.model.predictor import Predictor

    results: list[dict[str, Any]] = []
    pixels, slots = [], []
    for name in names:
        try:
            pixels.append(read_and_decode(name, cfg))
            slots.append(len(results))
            results.append({"file": name})
        except ImageError as exc:
            results.append({"file": name, "error": {"code": exc.code, "message": exc.message}})
    if pixels:
        batch = 1 << max(0, (len(pixels) - 1).bit_length())
        predictor = Predictor.configured(cfg, max_batch=min(batch, 256))
        for slot, prediction in zip(slots, predictor.predict(np.stack(pixels)), strict=True):
            results[slot].update(prediction.as_dict())
            results[slot]["model"] = {"name": predictor.name, "version": predictor.version}
    return results
