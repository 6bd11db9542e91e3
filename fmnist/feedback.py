"""Feedback: the true labels of answered requests, kept on a topic for live accuracy and
training (docs/feedback.md).

A labelled record is the request's image (the message value) with headers saying what it is
(``label``), what a model answered (``predicted``, ``model_name``, ``model_version``) and who
labelled it (``source``): a worker publishes one for each request that carried a ``label``
header, with the answer and under the same at-least-once guarantee; `fmnist feedback ID N`
publishes one for a request sent earlier from this machine, found in the sent cache that
`fmnist send` keeps (``feedback.sent_dir``).

The feedback topic is the store: Kafka keeps its log (retention); on Pub/Sub the subscription
``<topic>-sub``, made with the topic and never acknowledged, holds every record published since
(as the jobs' history, docs/decisions.md#job-history). Reading takes nothing away.

Heavy modules (numpy, imaging, the dataset's class names) are imported where they are used, so
that `fmnist send` starts at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmnist.brokers.base import Broker, Message, OutMessage
from fmnist.brokers.retained import read_all
from fmnist.config import Config, ImagingConfig
from fmnist.data import ExtraImages
from fmnist.errors import MissingArtifactError, UsageError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("fmnist.feedback")

SCHEMA = "fmnist.feedback/1"
SOURCES = ("request", "feedback")  # a worker saw a labelled request / `fmnist feedback`
_DIGITS = {str(i): i for i in range(10)}


@dataclass(frozen=True)
class Record:
    """One labelled image. ``predicted`` and the model are None when nobody knows the answer
    (`fmnist feedback` for a request sent without --wait)."""

    request_id: str
    label: int
    image: bytes
    source: str
    time_ms: int
    predicted: int | None = None
    model_name: str | None = None
    model_version: str | None = None
    worker_id: str | None = None

    @property
    def correct(self) -> bool | None:
        return None if self.predicted is None else self.predicted == self.label


def message(topic: str, record: Record) -> OutMessage:
    """``record`` as a message of the feedback topic, keyed by its request id."""
    headers = {"schema": SCHEMA, "request_id": record.request_id, "label": str(record.label),
               "source": record.source, "time": str(record.time_ms)}
    optional = {"predicted": record.predicted, "model_name": record.model_name,
                "model_version": record.model_version, "worker_id": record.worker_id}
    headers.update((k, str(v)) for k, v in optional.items() if v is not None)
    return OutMessage(topic, record.image, key=record.request_id, headers=headers)


def parse(msg: Message) -> Record | None:
    """A message of the feedback topic as a ``Record``; None for anything else on it."""
    h = msg.headers
    label, request_id = parse_wire_label(h.get("label")), h.get("request_id")
    if h.get("schema") != SCHEMA or label is None or not request_id or not msg.value:
        return None
    try:
        time_ms = int(h.get("time") or msg.broker_time_ms or 0)
    except ValueError:
        time_ms = msg.broker_time_ms or 0
    return Record(request_id, label, msg.value, h.get("source", "unknown"), time_ms,
                  parse_wire_label(h.get("predicted")), h.get("model_name"),
                  h.get("model_version"), h.get("worker_id"))


def parse_wire_label(text: str | None) -> int | None:
    """The ``label`` header of a request or a record: exactly one digit 0-9, else None."""
    return _DIGITS.get(text) if text is not None else None


def parse_label(text: str) -> int:
    """A label as the user gives it: 0-9, or a class name in any case ("sneaker",
    "Ankle boot", "t-shirt"). ``UsageError`` otherwise."""
    if (label := _DIGITS.get(text.strip())) is not None:
        return label
    from fmnist.data import CLASS_NAMES

    wanted = _squash(text)
    for i, name in enumerate(CLASS_NAMES):
        if wanted and wanted in (_squash(name), *(_squash(part) for part in name.split("/"))):
            return i
    raise UsageError(f"{text!r} is not a label.",
                     "Give a number 0-9 or a class name: "
                     + ", ".join(f"{i} {n}" for i, n in enumerate(CLASS_NAMES)) + ".")


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def latest(records: Iterable[Record]) -> list[Record]:
    """One record per request id, oldest first. The newest label wins (a request labelled
    twice, or delivered twice); what the model predicted is kept from whichever record knows
    it, since a correction sent later with `fmnist feedback` may not."""
    merged: dict[str, Record] = {}
    for r in sorted(records, key=lambda r: r.time_ms):  # stable: ties keep the read order
        known = merged.get(r.request_id)
        if known is not None and r.predicted is None and known.predicted is not None:
            r = replace(r, predicted=known.predicted, model_name=known.model_name,
                        model_version=known.model_version, worker_id=known.worker_id)
        merged[r.request_id] = r
    return sorted(merged.values(), key=lambda r: r.time_ms)


def read(broker: Broker, cfg: Config, timeout_s: float = 30.0) -> list[Record]:
    """Every labelled record the feedback topic holds now, one per request (``latest``),
    read without taking any away (``brokers.retained.read_all``)."""
    if cfg.broker.create_topics:
        broker.ensure_topics([cfg.feedback.topic])
    return latest(read_all(broker, cfg.feedback.topic, parse, timeout_s))


def accuracy_by_version(records: list[Record]) -> dict[str, dict[str, Any]]:
    """Model version -> {"name", "labelled", "correct", "accuracy"} over the records whose
    prediction is known, one per request."""
    by_version: dict[str, dict[str, Any]] = {}
    for r in latest(records):
        if r.model_version is None or r.predicted is None:
            continue
        entry = by_version.setdefault(r.model_version, {"name": r.model_name, "labelled": 0,
                                                        "correct": 0, "accuracy": 0.0})
        entry["labelled"] += 1
        entry["correct"] += int(r.predicted == r.label)
    for entry in by_version.values():
        entry["accuracy"] = round(entry["correct"] / entry["labelled"], 4)
    return by_version


def training_images(records: list[Record], imaging_cfg: ImagingConfig
                    ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, 28, 28] and labels [n] of the records (one per request), decoded as
    serving decodes requests; an image that no longer decodes (the limits changed) is left out
    with a warning."""
    import numpy as np

    from fmnist import imaging
    from fmnist.errors import ImageError

    images, labels = [], []
    for r in latest(records):
        try:
            pixels = imaging.decode(r.image, imaging_cfg)
        except ImageError as exc:
            log.warning("feedback for %s left out: %s", r.request_id, exc.message)
            continue
        images.append(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
        labels.append(r.label)
    return (np.stack(images) if images else np.zeros((0, 28, 28), np.uint8),
            np.asarray(labels, np.int64))


def checksum(records: list[Record]) -> str:
    """SHA-256 of what training takes from the records: each request id, label and image."""
    digest = hashlib.sha256()
    for r in sorted(latest(records), key=lambda r: r.request_id):
        digest.update(f"{r.request_id}\0{r.label}\0".encode())
        digest.update(hashlib.sha256(r.image).digest())
    return digest.hexdigest()


def for_training(cfg: Config) -> ExtraImages | None:
    """What a training run adds to its fit set: the labelled images with
    ``train.with_feedback``, else None. Called before any training work, so a broker that is
    down fails the run at once."""
    return training_set(cfg) if cfg.train.with_feedback else None


def training_set(cfg: Config) -> ExtraImages:
    """Read the feedback topic of ``serve.broker`` and decode it for training (what the train
    command and a train job pass to ``model.train.train`` with ``train.with_feedback``)."""
    from fmnist.brokers import connect

    b = connect(cfg.serve.broker, cfg)
    try:
        b.check(cfg.broker.connect_timeout_s)
        records = read(b, cfg)
    finally:
        b.close()
    images, labels = training_images(records, cfg.imaging)
    if not len(labels):
        log.warning("no labelled images on %s (%s): training on the dataset alone",
                    cfg.feedback.topic, cfg.serve.broker)
    return ExtraImages(images, labels, {
        "images": len(labels), "records": len(records), "sha256": checksum(records),
        "topic": cfg.feedback.topic, "broker": cfg.serve.broker})


# --- the sent cache: what `fmnist send` sent, so that `fmnist feedback ID N` can label it ---

@dataclass(frozen=True)
class Sent:
    """One request as `fmnist send` published it, with its answer when it waited for one."""

    request_id: str
    file: str
    content_type: str
    sent_at_ms: int
    label: int | None = None
    predicted: int | None = None
    model_name: str | None = None
    model_version: str | None = None


def _entry(folder: Path, request_id: str) -> Path:
    """The cache entry of a request (``.json``; its image beside it as ``.bin``). Ids that are
    not plain file names (the protocol allows ``/``) are stored under their hash."""
    name = request_id if re.fullmatch(r"[A-Za-z0-9_-]{1,128}", request_id) else \
        hashlib.sha256(request_id.encode()).hexdigest()
    return folder / f"{name}.json"


def remember(cfg: Config, sent: list[tuple[Sent, bytes]]) -> None:
    """Keep these requests (and their images) in ``feedback.sent_dir``, then only the newest
    ``feedback.sent_keep``. A cache that cannot be written costs the feedback command its
    lookup, never the send: it is logged."""
    folder, keep = cfg.feedback.sent_dir, cfg.feedback.sent_keep
    if keep == 0 or not sent:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for entry, image in sent[-keep:]:
            path = _entry(folder, entry.request_id)
            _write(path.with_suffix(".bin"), image)
            _write(path, json.dumps(asdict(entry)).encode())  # last: the entry exists now
        prune(folder, keep)
    except OSError as exc:
        log.warning("could not record the requests sent in %s (%s); `fmnist feedback` will "
                    "not find them", folder, exc.strerror or exc)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def prune(folder: Path, keep: int) -> int:
    """Delete all but the ``keep`` newest entries; returns how many were deleted."""
    entries = sorted(folder.glob("*.json"), key=_mtime_ns, reverse=True)
    for path in entries[keep:]:
        for stale in (path, path.with_suffix(".bin")):
            stale.unlink(missing_ok=True)
    return max(0, len(entries) - keep)


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:  # deleted meanwhile (another send pruning): oldest
        return 0


def recall(cfg: Config, request_id: str) -> tuple[Sent, bytes]:
    """A request `fmnist send` recorded here, with its image; ``MissingArtifactError`` if none."""
    folder = cfg.feedback.sent_dir
    path = _entry(folder, request_id)
    try:
        entry = Sent(**json.loads(path.read_bytes()))
        return entry, path.with_suffix(".bin").read_bytes()
    except (OSError, ValueError, TypeError):
        held = len(list(folder.glob("*.json"))) if folder.is_dir() else 0
        raise MissingArtifactError(
            f"Request {request_id} is not among the {held} request(s) recorded in {folder}.",
            "`fmnist feedback` labels requests sent from this machine with `fmnist send`, the "
            "newest `feedback.sent_keep` of them (FMNIST_FEEDBACK__SENT_KEEP); check the id, "
            "or send the image again with `fmnist send IMAGE --label N`.") from None


def label_sent(broker: Broker, cfg: Config, request_id: str, label: int,
               timeout_s: float = 30.0, sent: tuple[Sent, bytes] | None = None
               ) -> dict[str, Any]:
    """Publish the labelled record of a request sent earlier from this machine (``sent``:
    what ``recall`` found for it, if the caller looked first); returns what was published,
    without the image."""
    entry, image = sent or recall(cfg, request_id)
    record = Record(request_id, label, image, "feedback", int(time.time() * 1000),
                    entry.predicted, entry.model_name, entry.model_version)
    if cfg.broker.create_topics:
        broker.ensure_topics([cfg.feedback.topic])
    producer = broker.producer()
    try:
        producer.publish([message(cfg.feedback.topic, record)], timeout_s=timeout_s)
    finally:
        producer.close()
    return {"request_id": request_id, "label": label, "file": entry.file,
            "predicted": entry.predicted, "correct": record.correct,
            "model": ({"name": entry.model_name, "version": entry.model_version}
                      if entry.model_version else None),
            "topic": cfg.feedback.topic, "broker": broker.name}
