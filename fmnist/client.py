"""The client side: send images, wait for their answers, listen to the response topic.

Request-reply subscribes to the responses *before* publishing, so an answer can never arrive
before anyone is listening for it, and matches answers to requests by ``request_id``.
Duplicates (at-least-once delivery) are collapsed by request id. What was sent (and answered)
is kept in ``feedback.sent_dir``, so that `fmnist feedback ID N` can label it later.
"""

from __future__ import annotations

import json
import mimetypes
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmnist import feedback
from fmnist.brokers.base import Broker, Consumer, Message, OutMessage
from fmnist.config import Config, project_root
from fmnist.errors import BrokerTimeout, MissingArtifactError
from fmnist.serving import protocol

DEFAULT_IMAGE = "sneaker7.png"


@dataclass(frozen=True)
class Outgoing:
    path: Path
    payload: bytes
    request_id: str
    content_type: str
    label: int | None = None  # the true label, sent as the `label` header


def resolve_image(name: str) -> Path:
    """A path that exists, else a bare name looked up in Images/ (so `sandal5.png` works)."""
    path = Path(name)
    if path.exists():
        return path
    candidate = project_root() / "Images" / name
    if path.name == name and candidate.exists():
        return candidate
    raise MissingArtifactError(f"Image {name} not found (also looked in {candidate.parent}).",
                               "Give a path to an image file, or a name from Images/ "
                               "(e.g. sneaker7.png).")


def read_images(names: list[str], label: int | None = None) -> list[Outgoing]:
    """Read every file before anything is published, so a bad name sends nothing at all.
    ``label``: the true label of every image."""
    outgoing = []
    for name in names or [DEFAULT_IMAGE]:
        path = resolve_image(name)
        try:
            payload = path.read_bytes()
        except OSError as exc:
            raise MissingArtifactError(f"Cannot read {path}: {exc.strerror}.",
                                       "Check the file's permissions and that it is a file.") from None
        if not payload:
            raise MissingArtifactError(f"{path} is empty.", "Send an image file with content.")
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        outgoing.append(Outgoing(path, payload, protocol.new_request_id(), content_type, label))
    return outgoing


def decode_response(message: Message) -> dict[str, Any]:
    try:
        body = json.loads(message.value)
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = {"status": "error", "error": {"code": "unreadable_response",
                                             "message": message.value[:200].decode(errors="replace")}}
    if not isinstance(body, dict):
        body = {"status": "error", "error": {"code": "unreadable_response", "message": str(body)}}
    body.setdefault("request_id", message.headers.get(protocol.REQUEST_ID) or message.key)
    sent_at = _int_or_none(message.headers.get(protocol.SENT_AT))
    body["received_latency_ms"] = (
        round(message.received_at * 1000 - sent_at, 1) if sent_at
        else (body.get("timings_ms") or {}).get("total"))
    return body


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def send(broker: Broker, cfg: Config, images: list[Outgoing], wait: bool = False,
         timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Publish each image; with ``wait``, return one answer per image in the order sent.
    Either way, what was published (and answered) is recorded for `fmnist feedback`."""
    if cfg.broker.create_topics:
        broker.ensure_topics([cfg.broker.request_topic, cfg.broker.response_topic])
    reader = broker.consumer(cfg.broker.response_topic, group=None) if wait else None
    try:
        producer = broker.producer()
        sent_at = {}
        messages = []
        for image in images:
            headers = protocol.request_headers(image.request_id, image.content_type,
                                               label=image.label)
            sent_at[image.request_id] = int(headers[protocol.SENT_AT])
            messages.append(OutMessage(cfg.broker.request_topic, image.payload,
                                       key=image.request_id, headers=headers))
        producer.publish(messages, timeout_s=timeout_s)
        producer.close()
        answers = {} if reader is None else collect(reader, {i.request_id for i in images},
                                                     timeout_s)
    finally:
        if reader is not None:
            reader.close()
    feedback.remember(cfg, [(_sent(i, sent_at[i.request_id], answers.get(i.request_id)),
                             i.payload) for i in images])
    if reader is None:
        return [{"request_id": i.request_id, "file": str(i.path), "status": "sent"}
                for i in images]
    missing = [i for i in images if i.request_id not in answers]
    if missing:
        raise BrokerTimeout(
            f"No answer within {timeout_s:g} s for {len(missing)} of {len(images)} request(s): "
            f"{', '.join(i.request_id for i in missing[:5])}.",
            "Is a worker running? Start one with `fmnist serve --broker ...`, or raise --timeout.")
    results = []
    for image in images:
        answer = answers[image.request_id]
        answer["file"] = str(image.path)
        answer["round_trip_ms"] = round(answer.pop("_received_at") * 1000
                                        - sent_at[image.request_id], 1)
        results.append(answer)
    return results


def _sent(image: Outgoing, sent_at_ms: int, answer: dict[str, Any] | None) -> feedback.Sent:
    """The sent cache's entry of one request, with the answer's prediction when it had one."""
    predicted = (answer or {}).get("label")
    if not isinstance(predicted, int):  # not waited for, not answered, or an error answer
        return feedback.Sent(image.request_id, str(image.path), image.content_type, sent_at_ms,
                             image.label)
    model = (answer or {}).get("model") or {}
    return feedback.Sent(image.request_id, str(image.path), image.content_type, sent_at_ms,
                         image.label, predicted, model.get("name"), model.get("version"))


def collect(reader: Consumer, wanted: set[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    """Read responses until every wanted id is answered or the time is up; first answer wins."""
    answers: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(answers) < len(wanted) and (left := deadline - time.monotonic()) > 0:
        for message in reader.next_batch(500, timeout_s=min(left, 0.5)):
            body = decode_response(message)
            rid = body.get("request_id")
            if rid in wanted and rid not in answers:
                body["_received_at"] = message.received_at
                answers[rid] = body
    return answers


def listen(broker: Broker, cfg: Config, count: int | None = None, timeout_s: float | None = None,
           from_beginning: bool = False, on_ready: Callable[[], None] | None = None
           ) -> Iterator[dict[str, Any]]:
    """Yield responses as they arrive, de-duplicated by request id.

    Default: only answers published from now on. ``from_beginning``: Kafka replays what the
    topic retains; Pub/Sub drains the shared ``res_predict-sub`` backlog (what the
    ML_as_a_Service scripts' listener read) and acknowledges what it shows.
    """
    if cfg.broker.create_topics:
        broker.ensure_topics([cfg.broker.response_topic])
    topic = cfg.broker.response_topic
    reader = broker.retained_reader(topic) if from_beginning else broker.consumer(topic)
    if on_ready:
        on_ready()  # the reader is open: answers published from now on will be seen
    seen: set[str] = set()
    shown = 0
    deadline = time.monotonic() + timeout_s if timeout_s else None
    try:
        while count is None or shown < count:
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait <= 0:
                return
            batch = reader.next_batch(100, timeout_s=wait)
            for message in batch:
                body = decode_response(message)
                rid = str(body.get("request_id"))
                if rid in seen:
                    continue
                seen.add(rid)
                shown += 1
                yield body
                if count is not None and shown >= count:
                    break
            if from_beginning and batch:
                reader.commit(batch)  # shown: handled, where the broker holds it for us
    finally:
        reader.close()


def dead_letters(broker: Broker, cfg: Config, count: int | None, timeout_s: float
                 ) -> Iterator[dict[str, Any]]:
    """What is in the dead-letter topic: why each request was rejected, with its origin."""
    if cfg.broker.create_topics:
        broker.ensure_topics([cfg.broker.dlq_topic])
    reader = broker.retained_reader(cfg.broker.dlq_topic)
    held: list[Message] = []
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while (count is None or len(seen) < count) and (left := deadline - time.monotonic()) > 0:
            batch = reader.next_batch(100, timeout_s=min(left, 0.5))
            held.extend(batch)
            for message in batch:
                if message.source_id in seen or (count is not None and len(seen) >= count):
                    continue
                seen.add(message.source_id)
                h = message.headers
                yield {"request_id": h.get("dlq_request_id"), "code": h.get("dlq_error_code"),
                       "message": h.get("dlq_error_message"), "source": h.get("dlq_source"),
                       "worker_id": h.get("dlq_worker_id"),
                       "time_ms": _int_or_none(h.get("dlq_time")), "bytes": len(message.value)}
    finally:
        reader.redeliver(held)  # only looking: leave them for whoever handles the DLQ
        reader.close()
