"""The client side of jobs: submit one, follow it, list them all, cancel one, and keep the
pictures a result carries."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fmnist.brokers.base import Broker
from fmnist.config import Config
from fmnist.errors import BrokerTimeout, MissingArtifactError, UsageError
from fmnist.jobs import history
from fmnist.jobs.history import JobState, Watch
from fmnist.jobs.protocol import MODEL_NAME, Job, event, event_message, job_message, new_job_id, who

OnEvent = Callable[[dict[str, Any]], None]


def _topics(broker: Broker, cfg: Config) -> None:
    if cfg.broker.create_topics:
        broker.ensure_topics([cfg.jobs.topic, cfg.jobs.events_topic, cfg.jobs.dlq_topic])


def submit(broker: Broker, cfg: Config, kind: str, options: dict[str, Any]) -> Job:
    """Queue a job: its ``submitted`` event first (so a listing shows it queued), then the job
    message itself; both confirmed by the broker before this returns."""
    _topics(broker, cfg)
    return _queue(broker, cfg, kind, options)


def _queue(broker: Broker, cfg: Config, kind: str, options: dict[str, Any]) -> Job:
    job = Job(new_job_id(), kind, options, who(), round(time.time(), 3))
    producer = broker.producer()
    try:
        producer.publish([
            event_message(cfg.jobs.events_topic, event(
                job.job_id, "submitted", kind=kind, options=options,
                submitted_by=job.submitted_by)),
            job_message(cfg.jobs.topic, job)], timeout_s=cfg.broker.connect_timeout_s)
    finally:
        producer.close()
    return job


def run(broker: Broker, cfg: Config, kind: str, options: dict[str, Any], on_event: OnEvent,
        timeout_s: float | None = None) -> dict[str, Any]:
    """Submit a job and follow it to its result event (which is returned)."""
    _topics(broker, cfg)
    watch = Watch(broker, cfg.jobs.events_topic)  # open before the job exists
    try:
        job = _queue(broker, cfg, kind, options)
        return follow(watch, job.job_id, on_event, timeout_s)
    finally:
        watch.close()


def watch(broker: Broker, cfg: Config, job_id: str, on_event: OnEvent,
          timeout_s: float | None = None) -> dict[str, Any]:
    """Re-attach: every event of the job so far, then new ones until its result."""
    _topics(broker, cfg)
    w = Watch(broker, cfg.jobs.events_topic)
    try:
        past = _history_of(lambda: w.history(job_id))
        if not past:
            raise MissingArtifactError(
                f"No job {job_id} in {cfg.jobs.events_topic} ({broker.name}).",
                f"`fmnist jobs list --broker {broker.name}` shows the jobs it holds.")
        for e in past:
            on_event(e)
            if e["type"] == "result":
                return e
        return follow(w, job_id, on_event, timeout_s)
    finally:
        w.close()


def follow(w: Watch, job_id: str, on_event: OnEvent, timeout_s: float | None) -> dict[str, Any]:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    events: Iterator[dict[str, Any]] = w.events(job_id)
    for e in events:
        if e["type"] != "idle":
            on_event(e)
        if e["type"] == "result":
            return e
        if deadline is not None and time.monotonic() > deadline:
            break
    raise BrokerTimeout(f"Job {job_id} has no result after {timeout_s:g} s; it goes on.",
                        f"Re-attach with `fmnist jobs watch {job_id}`, or raise --timeout.")


def jobs(broker: Broker, cfg: Config) -> list[JobState]:
    _topics(broker, cfg)
    return list(history.fold(history.read(broker, cfg.jobs.events_topic)).values())


def cancel(broker: Broker, cfg: Config, job_id: str) -> JobState:
    """Ask the job to stop: a queued job ends before it starts, a running one at its next
    batch; either way its result event says ``cancelled``."""
    _topics(broker, cfg)
    state = history.fold(_history_of(
        lambda: history.read_job(broker, cfg.jobs.events_topic, job_id))).get(job_id)
    if state is None:
        raise MissingArtifactError(
            f"No job {job_id} in {cfg.jobs.events_topic} ({broker.name}).",
            f"`fmnist jobs list --broker {broker.name}` shows the jobs it holds.")
    if state.ended:
        raise UsageError(f"Job {job_id} has already {state.status}; there is nothing to cancel.")
    producer = broker.producer()
    try:
        producer.publish([event_message(cfg.jobs.events_topic, event(
            job_id, "cancel_requested", requested_by=who()))],
            timeout_s=cfg.broker.connect_timeout_s)
    finally:
        producer.close()
    state.cancel_requested = True
    return state


def _history_of(read: Callable[[], list[dict[str, Any]]], tries: int = 3
                ) -> list[dict[str, Any]]:
    """A job's events, read again (twice at most, a second apart) while none are found: on
    Pub/Sub another reader at the same moment can have them in hand
    (docs/decisions.md#job-history)."""
    for attempt in range(tries):
        found = read()
        if found or attempt == tries - 1:
            return found
        time.sleep(1.0)
    return []


def save_pictures(result: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Write the result's PNGs as ``<model>.<picture>.png`` in ``folder``; their paths."""
    name = str((result.get("model") or {}).get("name") or "")
    if not MODEL_NAME.fullmatch(name):  # a name from the wire becomes a file name
        name = result["job_id"]
    saved = {}
    for picture, data in (result.get("pictures") or {}).items():
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.{picture}.png"
        path.write_bytes(base64.b64decode(data))
        saved[picture] = path
    return saved
