"""What the model registry writes: manifests, serving pointers and announcements.

A **manifest** describes one published model: name, version (the first 12 hex digits of the
artifact's SHA-256, the version every answer names), the full SHA-256 and size that a worker
checks before loading it, the meta.json written with the weights, its metrics and its lineage
(parent model, config, dataset checksums, the job that trained it).

A **pointer** says which version of a name the fleet serves. Its ``generation`` grows by one
with every promote and rollback; a worker only acts on a pointer newer than the last it acted
on, so it never goes back to an older version unless a rollback (a newer generation) says so.
``history`` holds the versions served before, newest first: what ``rollback`` returns to.

**Announcements** (schema ``fmnist.model-event/1``) go through the broker's
``registry.events_topic``: published, promoted, rolled_back (from the CLI), serving and refused
(from workers). They wake workers and are the fleet's history (``fmnist models show``).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fmnist.brokers import Message, OutMessage
from fmnist.errors import UsageError

EVENT_SCHEMA = "fmnist.model-event/1"
EVENT_TYPES = ("published", "promoted", "rolled_back", "serving", "refused")
# Why a worker refused a model; stable: metrics and events carry them.
REFUSAL_REASONS = ("fetch", "checksum", "incompatible", "load", "canary")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
VERSION_CHARS = 12  # as artifacts.file_version
LATEST = "latest"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    sha256: str
    size: int
    meta: dict[str, Any]
    lineage: dict[str, Any]
    published_at: float
    published_by: str
    location: dict[str, Any] = field(default_factory=dict)  # where the store keeps the bytes

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.meta.get("metrics") or {})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Pointer:
    name: str
    version: str
    generation: int
    history: list[str]  # versions served before this one, newest first
    by: str
    at: float
    action: str  # "promoted" or "rolled_back"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pointer:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def parse_ref(ref: str, default_name: str | None = None) -> tuple[str, str | None]:
    """"NAME@VERSION" -> (name, version); "NAME" -> (name, None); "@VERSION" uses the default.
    VERSION is a prefix of the SHA-256 (4 hex digits or more), or ``latest``: the newest
    published."""
    name, _, version = ref.partition("@")
    name = name or (default_name or "")
    if not MODEL_NAME.fullmatch(name):
        raise UsageError(f"{ref!r} does not name a model: expected NAME or NAME@VERSION.",
                         "Names are letters, digits, '.', '_' and '-'; `fmnist models list` "
                         "shows what is published.")
    if version and version != LATEST and not re.fullmatch(r"[0-9a-f]{4,64}", version):
        raise UsageError(f"{version!r} is not a model version: versions are hex digits (the "
                         "start of the weights' SHA-256), or `latest`.",
                         "`fmnist models list` shows them.")
    return name, version or None


def event(event_type: str, name: str, version: str, **fields: Any) -> dict[str, Any]:
    assert event_type in EVENT_TYPES, event_type
    return {"schema": EVENT_SCHEMA, "event_id": uuid.uuid4().hex, "type": event_type,
            "name": name, "version": version, "time": time.time(), **fields}


def event_message(topic: str, body: dict[str, Any]) -> OutMessage:
    return OutMessage(topic, json.dumps(body).encode(), key=body["name"],
                      headers={"schema": EVENT_SCHEMA, "type": body["type"]})


def parse_event(message: Message) -> dict[str, Any] | None:
    """The announcement a message carries, or None for anything else on the topic."""
    try:
        body = json.loads(message.value)
    except (ValueError, UnicodeDecodeError):
        return None
    if (not isinstance(body, dict) or body.get("schema") != EVENT_SCHEMA
            or body.get("type") not in EVENT_TYPES or not isinstance(body.get("name"), str)):
        return None
    return body
