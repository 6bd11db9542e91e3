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
import io
import struct
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmnist.config import DataConfig, project_root
from fmnist.errors import DataError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLITS = ("train", "test")
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
    dims = struct.unpack(f">{ndim}I", raw[4:header_end])
    expected = int(np.prod(dims)) + header_end
    if len(raw) != expected:
        raise DataError(f"{name} is truncated or padded: {len(raw)} bytes, its header promises "
                        f"{expected}.", HINT)
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(dims)


def _read_bytes(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path} is not a readable gzip file ({exc}); it is corrupt or was cut "
                        "short.", f"Delete it and fetch it again. {HINT}") from None


def _verify(name: str, raw: bytes, where: Path) -> str:
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
        sums[name] = _verify(name, raw, path)
        arrays[kind] = read_idx(raw, str(path))
    images, labels = arrays["images"], arrays["labels"]
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(f"{split} images {images.shape} and labels {labels.shape} do not match.")
    return Split(images, labels, sums)


def _load_csv(path: Path, split: str) -> Split:
    """The Kaggle layout: a header row, then `label,pixel1..pixel784` per image."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"Cannot read {path}: {exc}.", HINT) from None
    reader = csv.reader(io.StringIO(raw.decode("ascii", errors="replace")))
    header = next(reader, None)
    if not header or header[0] != "label" or len(header) != 785:
        raise DataError(f"{path} is not a Fashion-MNIST CSV: the header must be "
                        "`label,pixel1,...,pixel784`.", HINT)
    rows = []
    for line_no, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != 785:
            raise DataError(f"{path}:{line_no} has {len(row)} columns, expected 785; the file is "
                            "truncated or corrupt.", HINT)
        rows.append(row)
    try:
        table = np.array(rows, dtype=np.int64)
    except ValueError:
        raise DataError(f"{path} holds a value that is not a whole number.", HINT) from None
    if table.size and (table.min() < 0 or table[:, 1:].max() > 255 or table[:, 0].max() > 9):
        raise DataError(f"{path} holds a label outside 0..9 or a pixel outside 0..255.", HINT)
    if len(table) != SPLIT_SIZES[split]:
        raise DataError(f"{path} holds {len(table)} images; the {split} split has "
                        f"{SPLIT_SIZES[split]}. The file is truncated.", HINT)
    digest = hashlib.sha256(raw).hexdigest()
    return Split(table[:, 1:].astype(np.uint8).reshape(-1, 28, 28),
                 table[:, 0].astype(np.uint8), {path.name: digest})


def download(mirror_url: str, target: Path, timeout_s: float = 30.0,
             progress: Progress | None = None) -> None:
    """Fetch the four ``.gz`` files; resume ``.part`` files; verify before renaming into place."""
    target.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES.values():
        final = target / f"{name}.gz"
        if final.is_file():
            continue
        part = final.with_suffix(".gz.part")
        url = mirror_url.rstrip("/") + f"/{name}.gz"
        _fetch(url, part, timeout_s, progress)
        try:
            _verify(name, _read_bytes(part), Path(url))
        except DataError:
            part.unlink(missing_ok=True)  # a bad .part must not be resumed next time
            raise
        part.replace(final)


def _fetch(url: str, part: Path, timeout_s: float, progress: Progress | None) -> None:
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            if done and response.status != 206:  # server ignored Range: start over
                done = 0
            length = response.headers.get("Content-Length")
            total = done + int(length) if length else None
            with part.open("ab" if done else "wb") as out:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(part.name.removesuffix(".part"), done, total)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:  # the .part is already complete
            return
        raise DataError(f"Download of {url} failed: HTTP {exc.code}.",
                        "Check `data.mirror_url` (FMNIST_DATA__MIRROR_URL) or try again later.") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"Download of {url} failed: {getattr(exc, 'reason', exc)}.",
                        "Check your network and `data.mirror_url`; run the command again to "
                        "resume where it stopped.") from None


def describe(source: Source) -> dict[str, object]:
    """Sizes, class balance and checksums of both splits, for `fmnist data`."""
    from fmnist.model import CLASS_NAMES

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
