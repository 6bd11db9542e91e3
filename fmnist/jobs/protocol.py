"""The job wire format: job messages, job events, and the rules a job's options obey.

A job message (topic ``jobs.topic``) asks for one training or evaluation run::

    {"schema": "fmnist.job/1", "job_id": "job-…", "kind": "train",
     "options": {"train": {"epochs": 2, "limit": 3000}, "model": {"name": "quick"}},
     "submitted_by": "ana@laptop", "submitted_at": 1733350000.123}

Job events (topic ``jobs.events_topic``, key = job id) tell everything that happens to a job:
``submitted``, ``started``, ``progress``, ``epoch``, ``interrupted``, ``cancel_requested`` and,
last, ``result``. docs/jobs.md documents every field with an example.
"""

from __future__ import annotations

import getpass
import json
import re
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fmnist.brokers.base import Message, OutMessage
from fmnist.config import Config, TrainConfig, with_overrides
from fmnist.errors import ConfigError

JOB_SCHEMA = "fmnist.job/1"
EVENT_SCHEMA = "fmnist.job-event/1"
KINDS = ("train", "evaluate")
FINAL = ("succeeded", "failed", "cancelled")
EVENT_TYPES = ("submitted", "started", "progress", "epoch", "interrupted", "cancel_requested",
               "result")

# What a job may set: training and model options, never a path, a dataset or a broker. The
# teacher travels as a model name and is looked up in the job worker's weights directory.
TRAIN_KEYS = tuple(k for k in TrainConfig.__dataclass_fields__ if k != "teacher")
MODEL_KEYS = ("name", "filters", "convs_per_stage", "dense_units", "dropout", "top_k")
ALLOWED: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {"train": (*TRAIN_KEYS, "teacher"), "model": MODEL_KEYS},
    "evaluate": {"model": ("name",)}}
# A model name becomes a file name in the weights directory: no separators, no "..".
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class JobRejected(Exception):
    """A job message that cannot run. ``code`` is stable (it goes on the wire); ``job_id`` is
    set when the message named one, so its watchers can be told."""

    def __init__(self, code: str, message: str, job_id: str | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.job_id, self.hint = code, message, job_id, hint


@dataclass(frozen=True)
class Job:
    job_id: str
    kind: str
    options: dict[str, dict[str, Any]]
    submitted_by: str
    submitted_at: float


def new_job_id() -> str:
    return f"job-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def who() -> str:
    """user@host: who submitted or cancelled a job, published or promoted a model."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def job_message(topic: str, job: Job) -> OutMessage:
    body = {"schema": JOB_SCHEMA, "job_id": job.job_id, "kind": job.kind,
            "options": job.options, "submitted_by": job.submitted_by,
            "submitted_at": job.submitted_at}
    return OutMessage(topic, json.dumps(body).encode(), key=job.job_id,
                      headers={"job_id": job.job_id, "schema": JOB_SCHEMA})


def parse_job(message: Message, max_bytes: int) -> Job:
    """A job message as a ``Job``, or ``JobRejected`` saying exactly what is wrong with it."""
    job_id = message.headers.get("job_id")
    if len(message.value) > max_bytes:
        raise JobRejected("job_too_large", f"The job message is {len(message.value):,} bytes; "
                          f"the limit is {max_bytes:,} (jobs.max_job_bytes).", job_id,
                          "A job carries options only; send the options, not data.")
    try:
        body = json.loads(message.value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JobRejected("unreadable_job", f"The job message is not JSON ({exc}).",
                          job_id) from None
    if not isinstance(body, dict):
        raise JobRejected("unreadable_job", "The job message must be a JSON object.", job_id)
    job_id = body.get("job_id") if isinstance(body.get("job_id"), str) else job_id
    if job_id is not None and not MODEL_NAME.fullmatch(job_id):
        job_id = None  # not a name we can echo safely
    if body.get("schema") != JOB_SCHEMA:
        raise JobRejected("unsupported_schema", f"Job schema {body.get('schema')!r} is not "
                          f"supported; this job worker reads {JOB_SCHEMA!r}.", job_id,
                          "Submit it with an fmnist of the same version as the job worker.")
    if job_id is None:
        raise JobRejected("unreadable_job", "The job message has no valid job_id.")
    kind, options = body.get("kind"), body.get("options", {})
    if kind not in KINDS:
        raise JobRejected("unsupported_kind", f"Job kind {kind!r} is not one of "
                          f"{', '.join(KINDS)}.", job_id)
    if not isinstance(options, dict):
        raise JobRejected("invalid_options", "`options` must be an object of sections.", job_id)
    return Job(job_id, kind, options, str(body.get("submitted_by", "unknown"))[:200],
               float(body.get("submitted_at") or time.time()))


def carried_options(kind: str, settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Of what a user set locally, what a ``kind`` job carries: the others (paths, the
    broker) describe the submitting machine, not the job."""
    allowed = ALLOWED[kind]
    carried = {section: {k: v for k, v in values.items() if k in allowed.get(section, ())}
               for section, values in settings.items()}
    return {section: values for section, values in carried.items() if values}


def job_config(base: Config, job: Job) -> Config:
    """The job worker's config with the job's options on top, checked by the config's own
    rules; anything a job may not set is refused by name (``JobRejected``)."""
    allowed = ALLOWED[job.kind]
    options: dict[str, dict[str, Any]] = {}
    for section, values in job.options.items():
        if section not in allowed:
            raise JobRejected("invalid_options", f"A {job.kind} job may not set `{section}.*`; "
                              f"it may set: {', '.join(f'{s}.*' for s in allowed)}.", job.job_id)
        if not isinstance(values, dict):
            raise JobRejected("invalid_options", f"`options.{section}` must be an object.",
                              job.job_id)
        for key in values:
            if key not in allowed[section]:
                raise JobRejected("invalid_options", f"A {job.kind} job may not set "
                                  f"`{section}.{key}`; in `{section}` it may set: "
                                  f"{', '.join(allowed[section])}.", job.job_id)
        options[section] = dict(values)
    name = options.get("model", {}).get("name")
    if name is not None and not (isinstance(name, str) and MODEL_NAME.fullmatch(name)):
        raise JobRejected("invalid_options", f"`model.name` {name!r} is not a model name "
                          "(letters, digits, '.', '_', '-'; no paths).", job.job_id)
    if "teacher" in options.get("train", {}):
        teacher = options["train"]["teacher"]
        if teacher is not None and not (isinstance(teacher, str) and
                                        MODEL_NAME.fullmatch(teacher)):
            raise JobRejected("invalid_options", f"`train.teacher` {teacher!r} is not a model "
                              "name (or null to train on labels alone).", job.job_id)
        options["train"]["teacher"] = (None if teacher is None else
                                       str(base.model.weights_dir / f"{teacher}.keras"))
    try:
        return with_overrides(base, options, "job options")
    except ConfigError as exc:
        raise JobRejected("invalid_options", exc.message, job.job_id,
                          "Fix the option and submit the job again.") from None


def event(job_id: str, event_type: str, **fields: Any) -> dict[str, Any]:
    return {"schema": EVENT_SCHEMA, "event_id": uuid.uuid4().hex[:16], "job_id": job_id,
            "type": event_type, "time": round(time.time(), 3), **fields}


def event_message(topic: str, body: dict[str, Any]) -> OutMessage:
    return OutMessage(topic, json.dumps(body, default=str).encode(), key=body["job_id"],
                      headers={"job_id": body["job_id"], "schema": EVENT_SCHEMA,
                               "event": body["type"]})


def parse_event(message: Message) -> dict[str, Any] | None:
    """An event of a schema we read, else None (a newer fmnist's event is skipped, not fatal)."""
    try:
        body = json.loads(message.value)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(body, dict) or body.get("schema") != EVENT_SCHEMA:
        return None
    if not isinstance(body.get("job_id"), str) or body.get("type") not in EVENT_TYPES:
        return None
    return body


def dead_letter(message: Message, rejected: JobRejected, dlq_topic: str, worker_id: str
                ) -> OutMessage:
    """The original bytes plus why, in the same headers the request dead letters use."""
    headers = {k: v[:1024] for k, v in message.headers.items()}
    headers.update({"dlq_error_code": rejected.code, "dlq_error_message": rejected.message[:1024],
                    "dlq_source": message.source_id, "dlq_topic": message.topic,
                    "dlq_request_id": rejected.job_id or message.source_id,
                    "dlq_worker_id": worker_id, "dlq_time": str(int(time.time() * 1000))})
    return OutMessage(dlq_topic, message.value, key=rejected.job_id, headers=headers)
