"""The wire protocol (docs/protocol.md): request metadata in, one JSON response out.

A request's payload is the raw image file bytes, exactly what the ML_as_a_Service scripts' clients
published, so they keep working. Metadata is optional and travels as Kafka headers / Pub/Sub
attributes. A response is one JSON object per request, keyed (Kafka) by its request id.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from fmnist.brokers.base import Message, OutMessage

PROTOCOL_VERSION = "fmnist.v1"

# Header / attribute names.
REQUEST_ID = "request_id"
CONTENT_TYPE = "content_type"
SENT_AT = "sent_at"
REPLY_TO = "reply_to"
TRACEPARENT = "traceparent"
LABEL = "label"  # the true label, 0-9: the worker also publishes a feedback record
PROTOCOL = "protocol"
ERROR_CODE = "error_code"

MAX_HEADER_VALUE = 1024
MAX_HEADERS = 64
# sent_at is taken within 0..2**53 ms (the year 287,396; exact as a float): outside it, the
# response's timings overflowed a float or orjson's 64-bit ints (sent_at: 99999999999999999999)
# and the exception left the handler, so the worker crashed on that request at every delivery.
MAX_SENT_AT_MS = 2**53
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/@+=-]{1,128}$")
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")

# Stable error codes; clients may switch on them. Messages are for people and may change.
ERROR_CODES = {
    "empty_payload": "The request carried no bytes.",
    "payload_too_large": "The payload is over imaging.max_payload_bytes.",
    "unsupported_format": "Not one of the allowed image formats.",
    "undecodable_image": "An allowed format, but corrupt or truncated.",
    "image_too_large": "Width x height over imaging.max_pixels (checked before decoding).",
    "invalid_headers": "A header is malformed (bad request_id, sent_at, too many or too long).",
    "invalid_reply_to": "reply_to names a topic this worker may not answer on.",
    "invalid_request": "A JSON (Open Inference Protocol) body that cannot be used.",
    "internal_error": "The worker failed on this request; it has been dead-lettered.",
    "crashed_worker": "Worker processes died handling this request (serve.max_crashes); it "
                      "has been dead-lettered and is not handled again.",
}


class RequestError(Exception):
    """A request we answer with an error response instead of a prediction."""

    def __init__(self, code: str, message: str) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message


def new_request_id() -> str:
    return uuid.uuid4().hex


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)  # one per request: see brokers.base.Message
class Request:
    """What the worker knows about one received message after validating its metadata; not
    changed once made."""

    message: Message
    request_id: str
    derived_id: bool
    sent_at_ms: int | None
    reply_to: str
    content_type: str
    traceparent: str | None
    label: str | None = None  # the ``label`` header as sent, checked only when present


def reply_allowed(topic: str, response_topic: str) -> bool:
    """Answers go to the response topic or a per-client topic under it, nowhere else: a
    request must not be able to aim answers at the request topic, or at a topic that does not
    exist and would make every publish of its batch fail."""
    return bool(_TOPIC_RE.match(topic)) and (topic == response_topic
                                              or topic.startswith(response_topic + "."))


def parse_request(message: Message, response_topic: str) -> tuple[Request, RequestError | None]:
    """Validate metadata. Always returns a Request (so even a bad one can be answered) and the
    error, if any, that it must be answered with."""
    headers = message.headers
    error: RequestError | None = None
    if len(headers) > MAX_HEADERS or any(len(k) > 256 or len(v) > MAX_HEADER_VALUE
                                         for k, v in headers.items()):
        error = RequestError("invalid_headers", f"At most {MAX_HEADERS} headers of at most "
                                                f"{MAX_HEADER_VALUE} characters are accepted.")
    raw_id = headers.get(REQUEST_ID)
    derived = raw_id is None or not _REQUEST_ID_RE.match(raw_id)
    request_id = message.source_id if derived or raw_id is None else raw_id
    if raw_id is not None and derived and error is None:
        error = RequestError("invalid_headers", "request_id must be 1-128 characters of "
                                                "letters, digits and ._:/@+=-")
    sent_at = None
    if (raw_sent := headers.get(SENT_AT)) is not None:
        try:
            sent_at = int(raw_sent)
            if not 0 <= sent_at <= MAX_SENT_AT_MS:
                raise ValueError(raw_sent)
        except ValueError:
            sent_at = None
            if error is None:
                error = RequestError("invalid_headers", "sent_at must be epoch milliseconds.")
    reply_to = headers.get(REPLY_TO) or response_topic
    if not reply_allowed(reply_to, response_topic):
        error = error or RequestError(
            "invalid_reply_to", f"reply_to must be {response_topic!r} or start with "
                                f"{response_topic + '.'!r}; the answer went to {response_topic!r}.")
        reply_to = response_topic
    traceparent = headers.get(TRACEPARENT)
    if traceparent is not None and not _TRACEPARENT_RE.match(traceparent):
        traceparent = None  # W3C: an invalid traceparent is ignored, not an error
    return Request(message, request_id, derived, sent_at, reply_to,
                   headers.get(CONTENT_TYPE, ""), traceparent, headers.get(LABEL)), error


def response(request: Request, *, model: dict[str, str], worker_id: str,
             inference_ms: float | None, prediction: dict[str, Any] | None = None,
             error: RequestError | None = None, body: dict[str, Any] | None = None,
             feedback: dict[str, Any] | None = None) -> OutMessage:
    """The JSON response for one request (a prediction or an error), ready to publish.

    ``body`` replaces our JSON with another protocol's (Open Inference Protocol); the headers,
    key and reply topic stay ours either way. ``feedback``: what became of the request's
    ``label`` header (docs/feedback.md)."""
    finished = now_ms()
    received_ms = request.message.received_at * 1000
    queued_since = request.sent_at_ms or request.message.broker_time_ms
    if body is not None:
        return OutMessage(request.reply_to, orjson.dumps(body),
                          key=request.request_id, headers=response_headers(request, error))
    body = {
        "protocol": PROTOCOL_VERSION,
        "request_id": request.request_id,
        "request_id_derived": request.derived_id,
        "status": "error" if error else "ok",
        **(prediction or {}),
        "model": model,
        "worker_id": worker_id,
        "timings_ms": {
            "queue_wait": round(received_ms - queued_since, 2) if queued_since else None,
            "inference": round(inference_ms, 3) if inference_ms is not None else None,
            "worker": round(finished - received_ms, 2),
            "total": (finished - request.sent_at_ms) if request.sent_at_ms else None,
        },
    }
    if error:
        body["error"] = {"code": error.code, "message": error.message}
    if feedback is not None:
        body["feedback"] = feedback
    return OutMessage(request.reply_to, orjson.dumps(body),
                      key=request.request_id, headers=response_headers(request, error))


def response_headers(request: Request, error: RequestError | None) -> dict[str, str]:
    headers = {REQUEST_ID: request.request_id, CONTENT_TYPE: "application/json",
               PROTOCOL: PROTOCOL_VERSION}
    if request.traceparent:
        headers[TRACEPARENT] = request.traceparent
    if error:
        headers[ERROR_CODE] = error.code
    return headers


def dead_letter(request: Request, error: RequestError, dlq_topic: str, worker_id: str
                ) -> OutMessage:
    """The original bytes and headers, plus why, for the dead-letter topic."""
    message = request.message
    headers = {k: v for k, v in message.headers.items() if len(v) <= MAX_HEADER_VALUE}
    headers.update({
        "dlq_error_code": error.code,
        "dlq_error_message": error.message[:MAX_HEADER_VALUE],
        "dlq_source": message.source_id,
        "dlq_topic": message.topic,
        "dlq_request_id": request.request_id,
        "dlq_worker_id": worker_id,
        "dlq_time": str(now_ms()),
    })
    return OutMessage(dlq_topic, message.value, key=request.request_id, headers=headers)


def request_headers(request_id: str, content_type: str, reply_to: str | None = None,
                    traceparent: str | None = None, label: int | None = None) -> dict[str, str]:
    """What `fmnist send` attaches to each image."""
    headers = {REQUEST_ID: request_id, CONTENT_TYPE: content_type, SENT_AT: str(now_ms())}
    if label is not None:
        headers[LABEL] = str(label)
    if reply_to:
        headers[REPLY_TO] = reply_to
    if traceparent:
        headers[TRACEPARENT] = traceparent
    return headers
