"""The model store in Kafka itself: no shared disk, nothing besides the broker to run.

Two compacted topics of one partition each (docs/models.md#the-store):

- ``registry.blob_topic``: each artifact in chunks of ``registry.chunk_bytes`` (under the
  broker's default 1 MiB message limit, so no broker or topic setting has to change), keyed
  ``NAME@VERSION/INDEX``. Keys are never reused, so compaction keeps every chunk.
- ``registry.topic``: ``manifest/NAME@VERSION`` (written after all its chunks are confirmed,
  with their offsets) and ``serving/NAME``, the pointer, whose latest value compaction keeps.

Reading the index reads ``registry.topic`` to its end (it holds small JSON only); fetching a
model reads just the offsets its manifest names in the blob topic, however many models it holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fmnist.brokers.kafka import log
from fmnist.brokers.kafka.broker import KafkaBroker
from fmnist.config import Config
from fmnist.errors import ModelError
from fmnist.registry.protocol import Manifest, Pointer
from fmnist.registry.store import atomic_write


class KafkaStore:
    def __init__(self, cfg: Config, broker: KafkaBroker) -> None:
        self.cfg, self.broker = cfg, broker
        self.topic, self.blob_topic = cfg.registry.topic, cfg.registry.blob_topic
        self.where = f"Kafka {broker.address} topics {self.topic}, {self.blob_topic}"
        self.timeout_s = max(10.0, cfg.broker.connect_timeout_s)
        self._ensured = False

    def _ensure(self) -> None:
        if not self._ensured:
            log.ensure_compacted(self.broker, [self.topic, self.blob_topic])
            self._ensured = True

    def put(self, manifest: Manifest, artifact: Path) -> Manifest:
        self._ensure()
        data = artifact.read_bytes()
        size = self.cfg.registry.chunk_bytes
        chunks = [(f"{manifest.ref}/{i}", data[start:start + size])
                  for i, start in enumerate(range(0, max(len(data), 1), size))]
        offsets = log.append(self.broker, self.blob_topic, chunks, self.timeout_s * 3)
        stored = Manifest(**{**manifest.__dict__, "location": {
            "topic": self.blob_topic, "partition": 0, "first_offset": offsets[0],
            "last_offset": offsets[-1], "chunks": len(chunks)}})
        log.append(self.broker, self.topic, [(f"manifest/{manifest.ref}",
                                              json.dumps(stored.as_dict()).encode())],
                   self.timeout_s)
        return stored

    def set_pointer(self, pointer: Pointer) -> None:
        self._ensure()
        log.append(self.broker, self.topic, [(f"serving/{pointer.name}",
                                              json.dumps(pointer.as_dict()).encode())],
                   self.timeout_s)

    def _index(self) -> dict[str, dict[str, Any]]:
        """The latest value of every key of ``registry.topic``."""
        self._ensure()
        latest: dict[str, dict[str, Any]] = {}
        for record in log.read(self.broker, self.topic, timeout_s=self.timeout_s * 3):
            if record.value is None:
                latest.pop(record.key, None)  # a tombstone
                continue
            try:
                latest[record.key] = json.loads(record.value)
            except ValueError:
                continue  # not ours
        return latest

    def manifests(self, name: str | None = None) -> list[Manifest]:
        prefix = f"manifest/{name}@" if name else "manifest/"
        found = []
        for key, value in self._index().items():
            if key.startswith(prefix):
                try:
                    found.append(Manifest.from_dict(value))
                except TypeError:
                    continue
        return sorted(found, key=lambda m: m.published_at)

    def pointer(self, name: str) -> Pointer | None:
        value = self._index().get(f"serving/{name}")
        return Pointer.from_dict(value) if value else None

    def fetch(self, manifest: Manifest, dest: Path) -> None:
        where = manifest.location
        try:
            first, last, count = (int(where["first_offset"]), int(where["last_offset"]),
                                  int(where["chunks"]))
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"The manifest of {manifest.ref} does not say where its chunks are.",
                             "Publish it again with `fmnist models publish`.") from None
        prefix = f"{manifest.ref}/"
        chunks: dict[int, bytes] = {}
        for record in log.read(self.broker, where.get("topic", self.blob_topic), first, last,
                               self.timeout_s * 3):
            if record.key.startswith(prefix) and record.value is not None:
                chunks[int(record.key[len(prefix):])] = record.value
        missing = [i for i in range(count) if i not in chunks]
        if missing:
            raise ModelError(f"{manifest.ref}: {len(missing)} of {count} chunks are missing from "
                             f"{self.blob_topic} (offsets {first}-{last}).",
                             "Publish it again with `fmnist models publish`.")
        atomic_write(dest, b"".join(chunks[i] for i in range(count)))

    def close(self) -> None:
        pass
