"""Where published models live, so that every worker can fetch them without a shared disk.

Two stores, one interface (docs/models.md#the-store):

- ``KafkaStore`` (``registry.store: kafka``, the default with Kafka): the broker itself, in two
  compacted single-partition topics: manifests and pointers in ``registry.topic``, artifacts in
  ``registry.blob_topic`` in chunks under the message size limit.
- ``DirStore`` (``registry.store: dir``, the default with Pub/Sub, which cannot store): a
  directory on local disk, NFS or a mounted volume, written with atomic renames.

A store only keeps bytes and says where they are; checking them (SHA-256, input spec, canary)
is the worker's job (``registry.verify``), so a damaged store never reaches the model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Protocol

from fmnist.brokers import Broker
from fmnist.config import Config
from fmnist.errors import ModelError
from fmnist.registry.protocol import Manifest, Pointer


class Store(Protocol):
    where: str  # for messages: the directory, or the broker and topic

    def put(self, manifest: Manifest, artifact: Path) -> Manifest:
        """Store ``artifact``'s bytes, then ``manifest`` (returned with its ``location``):
        a reader never finds a manifest whose bytes are not all there yet."""

    def manifests(self, name: str | None = None) -> list[Manifest]:
        """Every published model (of ``name``), oldest first."""

    def fetch(self, manifest: Manifest, dest: Path) -> None:
        """Write the stored bytes of ``manifest`` to ``dest``; ModelError when they are gone."""

    def pointer(self, name: str) -> Pointer | None:
        """Which version of ``name`` the fleet serves, if one was ever promoted."""

    def set_pointer(self, pointer: Pointer) -> None: ...

    def close(self) -> None: ...


def open_store(cfg: Config, broker: Broker) -> Store:
    """The configured store: ``registry.store`` auto means the broker's own (Kafka's topics),
    or the directory where the broker cannot store (Pub/Sub)."""
    kind = cfg.registry.store
    if kind == "auto":
        kind = "kafka" if broker.name == "kafka" else "dir"
    if kind == "kafka":
        if broker.name != "kafka":
            raise ModelError("registry.store is `kafka` but the broker is Pub/Sub, which "
                             "cannot store models.",
                             "Set registry.store to `dir` (or `auto`) and registry.dir to a "
                             "directory every worker mounts.")
        from fmnist.registry.kafka_store import KafkaStore

        return KafkaStore(cfg, broker)  # type: ignore[arg-type]
    return DirStore(cfg.registry.dir)


def atomic_write(path: Path, data: bytes) -> None:
    """Write beside, then rename: readers on the same file system (NFS too) see the old file
    or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class DirStore:
    """``<dir>/<name>/<version>/model.keras`` and ``manifest.json`` (written last: a version
    is published once its manifest exists), and ``<dir>/<name>/serving.json``, the pointer."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.where = str(root)

    def _folder(self, name: str, version: str) -> Path:
        return self.root / name / version

    def put(self, manifest: Manifest, artifact: Path) -> Manifest:
        folder = self._folder(manifest.name, manifest.version)
        try:
            atomic_write(folder / "model.keras", artifact.read_bytes())
            stored = Manifest(**{**manifest.__dict__,
                                 "location": {"dir": str(folder), "file": "model.keras"}})
            atomic_write(folder / "manifest.json",
                         json.dumps(stored.as_dict(), indent=2).encode() + b"\n")
        except OSError as exc:
            raise ModelError(f"Cannot write to the model store {self.root}: {exc}.",
                             "Check registry.dir: it must be a directory this user can write "
                             "(every worker reads it).") from None
        return stored

    def manifests(self, name: str | None = None) -> list[Manifest]:
        found = []
        for path in sorted(self.root.glob(f"{name or '*'}/*/manifest.json")):
            try:
                found.append(Manifest.from_dict(json.loads(path.read_text())))
            except (OSError, ValueError, TypeError, KeyError):
                continue  # half-copied by hand, or not ours: not a published model
        return sorted(found, key=lambda m: m.published_at)

    def fetch(self, manifest: Manifest, dest: Path) -> None:
        source = self._folder(manifest.name, manifest.version) / "model.keras"
        try:
            atomic_write(dest, source.read_bytes())
        except FileNotFoundError:
            raise ModelError(f"{manifest.ref} is published but {source} is gone.",
                             "Publish it again with `fmnist models publish`.") from None

    def pointer(self, name: str) -> Pointer | None:
        try:
            return Pointer.from_dict(json.loads((self.root / name / "serving.json").read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise ModelError(f"{self.root / name / 'serving.json'} is damaged ({exc}).",
                             f"Promote a version again: `fmnist models promote {name}@VERSION`."
                             ) from None

    def set_pointer(self, pointer: Pointer) -> None:
        atomic_write(self.root / pointer.name / "serving.json",
                     json.dumps(pointer.as_dict(), indent=2).encode() + b"\n")

    def close(self) -> None:
        pass
