"""What happened to jobs, from their events: read what the events topic holds, fold it into
one state per job, and follow new events live.

The events topic is the history: Kafka keeps its log (retention), and on Pub/Sub the
subscription ``<events topic>-sub``, made with the topic and never acknowledged, holds every
event published since (docs/decisions.md#job-history).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from fmnist.brokers.base import Broker, Consumer
from fmnist.brokers.retained import read_all
from fmnist.jobs.protocol import FINAL, parse_event


def read(broker: Broker, topic: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Every event the topic holds now, oldest first (``brokers.retained.read_all``)."""
    return ordered(read_all(broker, topic, parse_event, timeout_s))


def read_job(broker: Broker, topic: str, job_id: str) -> list[dict[str, Any]]:
    """The events of one job the topic holds now, oldest first."""
    return [e for e in read(broker, topic) if e["job_id"] == job_id]


def ordered(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Oldest first, each event once (delivery is at least once)."""
    unique = {e.get("event_id"): e for e in events}
    return sorted(unique.values(), key=lambda e: (float(e.get("time") or 0), e.get("seq", 0)))


@dataclass
class JobState:
    job_id: str
    kind: str | None = None
    status: str = "queued"  # queued, running, interrupted, succeeded, failed, cancelled
    submitted_by: str | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    worker_id: str | None = None
    attempts: int = 0
    epoch: int | None = None  # epochs completed
    epochs: int | None = None
    cancel_requested: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None

    @property
    def ended(self) -> bool:
        return self.status in FINAL

    def duration_s(self, now: float | None = None) -> float | None:
        if self.started_at is None:
            return None
        end = self.ended_at if self.ended_at is not None else (now or time.time())
        return round(end - self.started_at, 1)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["duration_s"] = self.duration_s()
        if self.result is not None:  # pictures stay out of listings
            data["result"] = {k: v for k, v in self.result.items() if k != "pictures"}
        return data


def apply(state: JobState, e: dict[str, Any]) -> None:
    """One event's effect on its job's state."""
    kind = e["type"]
    if kind == "submitted":
        state.kind = e.get("kind", state.kind)
        state.submitted_by, state.submitted_at = e.get("submitted_by"), e.get("time")
        state.options = e.get("options") or {}
    elif kind == "started":
        state.attempts += 1
        state.kind = e.get("kind", state.kind)
        state.worker_id = e.get("worker_id")
        state.started_at = state.started_at or e.get("time")
        if not state.ended:
            state.status = "running"
        if e.get("resumed_from_epoch") is not None:
            state.epoch = e["resumed_from_epoch"]
    elif kind in ("progress", "epoch") and not state.ended:
        state.status = "running"
        state.epochs = e.get("epochs", state.epochs)
        if kind == "epoch":
            state.epoch = int(e["epoch"]) + 1
    elif kind == "interrupted" and not state.ended:
        state.status = "interrupted"
    elif kind == "cancel_requested":
        state.cancel_requested = True
    elif kind == "result":
        state.status = e.get("status", "failed")
        state.ended_at = e.get("time")
        state.worker_id = e.get("worker_id", state.worker_id)
        state.result = e


def fold(events: list[dict[str, Any]]) -> dict[str, JobState]:
    """One state per job, in the order the jobs were first seen."""
    states: dict[str, JobState] = {}
    for e in events:
        apply(states.setdefault(e["job_id"], JobState(e["job_id"])), e)
    return states


class Watch:
    """A live reader of the events topic, opened before anything is published or read, so no
    event can slip between the history and the live stream."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.broker, self.topic = broker, topic
        self.live: Consumer = broker.consumer(topic)
        self.seen: set[str] = set()

    def history(self, job_id: str | None = None) -> list[dict[str, Any]]:
        events = (read(self.broker, self.topic) if job_id is None
                  else read_job(self.broker, self.topic, job_id))
        return [e for e in events if self._new(e)]

    def events(self, job_id: str, poll_s: float = 0.5) -> Iterator[dict[str, Any]]:
        """New events of one job, as they arrive; the caller stops at its result."""
        while True:
            batch = self.live.next_batch(500, timeout_s=poll_s)
            for e in ordered([e for m in batch if (e := parse_event(m)) is not None]):
                if e["job_id"] == job_id and self._new(e):
                    yield e
            if not batch:  # nothing new: a chance for the caller to check its clock
                yield {"type": "idle", "job_id": job_id}

    def _new(self, e: dict[str, Any]) -> bool:
        key = str(e.get("event_id"))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True

    def close(self) -> None:
        self.live.close()
