"""Find, download, verify and load Fashion-MNIST.

Sources, tried in order: the configured ``data.data_dir``; ``<project>/data``; Debian's
``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``); else, when
``data.download`` is on, a download of the original IDX files into ``<project>/data``.

A source holds either the four original IDX files (``.gz`` or uncompressed) or the Kaggle CSV
pair (``fashion-mnist_train.csv`` / ``fashion-mnist_test.csv``, ``label,pixel1..pixel784``).

Checksums are SHA-256 of the *decompressed* IDX bytes, so they hold for every faithful copy:
Debian recompressed the upstream ``.gz`` files (other bytes, same images), and users may have
gunzipped them. A download is additionally written to a ``.part`` file, resumed with an HTTP
Range request if interrupted, and only renamed into place once its content verifies.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import http.client
import io
import re
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmnist.config import DataConfig, project_root
from fmnist.errors import DataError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLITS = ("train", "test")
# The dataset's ten classes, by label index (the model's outputs follow the same order).
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
# SHA-256 of the decompressed IDX files, and the row counts they must hold.
IDX_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
SPLIT_SIZES = {"train": 60000, "test": 10000}
CSV_FILES = {"train": "fashion-mnist_train.csv", "test": "fashion-mnist_test.csv"}
HINT = ("Install Debian's `dataset-fashion-mnist` package, put the IDX or CSV files in data/, or "
        "run `fmnist data --download`.")

Progress = Callable[[str, int, int | None], None]  # (file name, bytes done, total or None)


@dataclass(frozen=True)
class Source:
    """Where the dataset was found and in which layout ("idx" or "csv")."""

    directory: Path
    layout: str

    def describe(self) -> str:
        return f"{self.layout.upper()} files in {self.directory}"


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray  # uint8 [N]
    sha256: dict[str, str]  # file -> checksum of its content, recorded in meta.json


@dataclass(frozen=True)
class ExtraImages:
    """Labelled images a training run adds to its fit set (never to validation or test):
    users' feedback (``fmnist.feedback.training_set``). ``source`` says where they came from;
    the model's meta.json records it."""

    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray  # [N]
    source: dict[str, Any]  # images, records, sha256, topic, broker


def candidate_dirs(cfg: DataConfig) -> list[Path]:
    dirs = [cfg.data_dir] if cfg.data_dir else []
    return [*dirs, project_root() / "data", DEBIAN_DIR]


def _idx_path(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def find(cfg: DataConfig) -> Source | None:
    """The first directory holding a complete dataset in either layout, or None."""
    for directory in candidate_dirs(cfg):
        if all(_idx_path(directory, name) for name in IDX_FILES.values()):
            return Source(directory, "idx")
        if all((directory / name).is_file() for name in CSV_FILES.values()):
            return Source(directory, "csv")
    return None


def locate(cfg: DataConfig, progress: Progress | None = None) -> Source:
    """Like ``find``, but downloads into data/ when nothing is found and downloading is on."""
    source = find(cfg)
    if source:
        return source
    if not cfg.download:
        searched = ", ".join(str(d) for d in candidate_dirs(cfg))
        raise DataError(f"Fashion-MNIST not found (searched {searched}).", HINT)
    target = cfg.data_dir or project_root() / "data"
    download(cfg.mirror_url, target, timeout_s=cfg.download_timeout_s, progress=progress)
    return Source(target, "idx")


def read_idx(raw: bytes, name: str) -> np.ndarray:
    """Parse one IDX file (already decompressed); every header field is checked."""
    if len(raw) < 8:
        raise DataError(f"{name} is truncated: {len(raw)} bytes is shorter than an IDX header.", HINT)
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise DataError(f"{name} is not an unsigned-byte IDX file (bad magic number).", HINT)
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise DataError(f"{name} is truncated: {len(raw)} bytes is shorter than its "
                        f"{header_end}-byte header.", HINT)
    dims = struct.unpack(f">{ndim}I", raw[4:header_end])
    expected = int(np.prod(dims, dtype=np.int64)) + header_end
    if len(raw) != expected:
        raise DataError(f"{name} is truncated or padded: {len(raw)} bytes, its header promises "
                        f"{expected}.", HINT)
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(dims)


def _read_bytes(path: Path, compressed: bool | None = None) -> bytes:
    """The decompressed content of ``path``; gzip unless told otherwise when it ends in .gz."""
    if compressed is None:
        compressed = path.name.endswith(".gz")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"Cannot read {path}: {exc}.", HINT) from None
    if not compressed:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path} is not a readable gzip file ({exc}); it is corrupt or was cut "
                        "short.", f"Delete it and fetch it again. {HINT}") from None


def _verify(name: str, raw: bytes, where: str | Path) -> str:
    digest = hashlib.sha256(raw).hexdigest()
    if digest != IDX_SHA256[name]:
        raise DataError(f"{where} fails its SHA-256 check (got {digest[:12]}…, expected "
                        f"{IDX_SHA256[name][:12]}…): the file is corrupt or not Fashion-MNIST.",
                        f"Delete it and fetch it again. {HINT}")
    return digest


def load_split(split: str, source: Source) -> Split:
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    if source.layout == "csv":
        return _load_csv(source.directory / CSV_FILES[split], split)
    arrays, sums = {}, {}
    for kind in ("images", "labels"):
        name = IDX_FILES[(split, kind)]
        path = _idx_path(source.directory, name)
        if path is None:
            raise DataError(f"{name} is missing from {source.directory}.", HINT)
        raw = _read_bytes(path)
        arrays[kind] = read_idx(raw, str(path))  # a cut or padded file says so, not just "checksum"
        sums[name] = _verify(name, raw, path)
    images, labels = arrays["images"], arrays["labels"]
    if images.shape[1:] != (28, 28) or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{split} images {images.shape} and labels {labels.shape} do not match.")
    return Split(images, labels, sums)


def _load_csv(path: Path, split: str, expected_rows: int | None = None) -> Split:
    """The Kaggle layout: a header row, then `label,pixel1..pixel784` per image.

    ``expected_rows`` defaults to the size of ``split``; a file with fewer rows is truncated.
    Parsed by NumPy's C reader: the 60k-row training file is 130 MB of text.
    """
    expected = SPLIT_SIZES[split] if expected_rows is None else expected_rows
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"Cannot read {path}: {exc}.", HINT) from None
    text = raw.decode("ascii", errors="replace")
    header = next(csv.reader(io.StringIO(text.partition("\n")[0])), None)
    if not header or header[0].strip() != "label" or len(header) != 785:
        raise DataError(f"{path} is not a Fashion-MNIST CSV: the header must be "
                        "`label,pixel1,...,pixel784`.", HINT)
    if not text.partition("\n")[2].strip():
        table = np.zeros((0, 785), dtype=np.int32)
    else:
        try:
            table = np.loadtxt(io.StringIO(text), delimiter=",", quotechar='"', skiprows=1,
                               dtype=np.int32, ndmin=2)
        except ValueError as exc:
            reason = str(exc).split(";")[0]  # drop NumPy's advice to use `usecols`
            raise DataError(f"{path} is truncated or corrupt: {reason}.", HINT) from None
    if table.shape[1] != 785:
        raise DataError(f"{path} has {table.shape[1]} columns, expected 785 (label + 784 "
                        "pixels).", HINT)
    if table.size and (table.min() < 0 or table[:, 1:].max() > 255 or table[:, 0].max() > 9):
        raise DataError(f"{path} holds a label outside 0..9 or a pixel outside 0..255.", HINT)
    if len(table) != expected:
        raise DataError(f"{path} holds {len(table)} images; the {split} split has "
                        f"{expected}. The file is truncated.", HINT)
    digest = hashlib.sha256(raw).hexdigest()
    return Split(table[:, 1:].astype(np.uint8).reshape(-1, 28, 28),
                 table[:, 0].astype(np.uint8), {path.name: digest})


def download(mirror_url: str, target: Path, timeout_s: float = 30.0,
             progress: Progress | None = None) -> None:
    """Fetch the four ``.gz`` files; resume ``.part`` files; verify before renaming into place.

    A file already in ``target`` is kept as it is (``load_split`` verifies it). ``timeout_s``
    bounds each connect and each read, so a stalled server fails instead of hanging.
    """
    target.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES.values():
        final = target / f"{name}.gz"
        if final.is_file():
            continue
        part = target / f"{name}.gz.part"
        url = mirror_url.rstrip("/") + f"/{name}.gz"
        _fetch(url, part, timeout_s, progress)
        try:
            raw = _read_bytes(part, compressed=True)
            read_idx(raw, url)
            _verify(name, raw, url)
        except DataError:
            part.unlink(missing_ok=True)  # a bad .part must not be resumed next time
            raise
        part.replace(final)


def _fetch(url: str, part: Path, timeout_s: float, progress: Progress | None) -> None:
    """Bring ``part`` up to the whole of ``url``, resuming with a Range request if it exists.

    A cut connection, a timeout or an HTTP error raises ``DataError`` and leaves ``part`` for the
    next attempt to resume. A server that ignores Range (200) sends the whole file: start over.
    """
    done = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            total: int | None
            if done and response.status == 206:
                start, total = _content_range(response.headers.get("Content-Range"))
                if start != done:
                    part.unlink()
                    raise DataError(f"Download of {url} failed: asked to resume at byte {done}, "
                                    f"the server answered from byte {start}.",
                                    "The partial file was deleted; run the command again.")
            else:
                done = 0
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            with part.open("ab" if done else "wb") as out:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(part.name.removesuffix(".part"), done, total)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and done:  # nothing left after byte `done`: verification decides
            return
        raise DataError(f"Download of {url} failed: HTTP {exc.code} {exc.reason}.",
                        "Check `data.mirror_url` (FMNIST_DATA__MIRROR_URL) or try again later."
                        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise DataError(f"Download of {url} failed: {getattr(exc, 'reason', exc)!s}.",
                        "Check your network and `data.mirror_url`; run the command again to "
                        "resume where it stopped.") from None
    if total is not None and done < total:  # http.client returns b"" when a connection drops
        raise DataError(f"Download of {url} stopped after {done} of {total} bytes.",
                        "Run the command again to resume where it stopped.")


def _content_range(value: str | None) -> tuple[int, int | None]:
    """Start and total size from ``bytes START-END/TOTAL`` (TOTAL may be ``*``)."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    if not match:
        raise DataError(f"The server answered a resume request with a bad Content-Range "
                        f"{value!r}.", "Delete the .part file and try again.")
    return int(match[1]), None if match[2] == "*" else int(match[2])


def describe(source: Source) -> dict[str, object]:
    """Sizes, class balance and checksums of both splits, for `fmnist data`."""

    info: dict[str, object] = {"source": str(source.directory), "layout": source.layout}
    for split in SPLITS:
        data = load_split(split, source)
        counts = np.bincount(data.labels, minlength=len(CLASS_NAMES))
        info[split] = {
            "images": int(len(data.labels)),
            "per_class": {CLASS_NAMES[i]: int(c) for i, c in enumerate(counts)},
            "sha256": data.sha256,
        }
    return info
