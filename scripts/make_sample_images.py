"""Write the sample images in Images/ from the Fashion-MNIST test split (deterministic).

Rule: for each class, the first image of that class in the test split (lowest index), saved
unchanged as a 28x28 8-bit greyscale PNG named ``<name><class index>.png``, e.g. ``boot9.png``.
The names are the ones users of the ML_as_a_Service scripts know. Images/labels.json records, per file,
the label, class name, test-set index and the SHA-256 of the PNG file.

    .venv/bin/python scripts/make_sample_images.py [--out Images]

Running it again rewrites the same files (same Pillow/zlib -> the same bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fmnist import config, data
from fmnist.data import CLASS_NAMES

NAMES = ("top", "trouser", "pullover", "dress", "coat",
         "sandal", "shirt", "sneaker", "bag", "boot")


def file_name(label: int) -> str:
    return f"{NAMES[label]}{label}.png"


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def choose(labels: np.ndarray) -> dict[int, int]:
    """Class index -> the test-set index of its first image."""
    return {label: int(np.flatnonzero(labels == label)[0]) for label in range(len(CLASS_NAMES))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=config.project_root() / "Images")
    args = parser.parse_args(argv)
    cfg = config.load()
    test = data.load_split("test", data.locate(cfg.data))
    args.out.mkdir(parents=True, exist_ok=True)
    labels = {}
    for label, index in choose(test.labels).items():
        name = file_name(label)
        payload = png_bytes(test.images[index])
        (args.out / name).write_bytes(payload)
        labels[name] = {"label": label, "class_name": CLASS_NAMES[label], "test_index": index,
                        "sha256": hashlib.sha256(payload).hexdigest()}
        print(f"{name:14} test[{index}]  {CLASS_NAMES[label]}", file=sys.stderr)
    (args.out / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
