"""The pure part of a worker: a batch of request messages in, the messages to publish out.

No broker here, so it is unit-testable on its own. Every request gets exactly one answer: a
prediction, or an error response plus a dead-letter record. A bad request never takes the
batch down or holds up the others in it (the Ray Serve rule: a batch returns as many results
as it got inputs), and a model that fails answers every request of its batch with an error.

A batch is handled in two steps so that the pipeline can overlap them with broker work:
``prepare`` parses and decodes the batch and dispatches its forward pass (JAX runs it on
XLA's threads); ``Prepared.finish`` waits for the pass and builds the answers.

A request with a ``label`` header (the true label, docs/feedback.md) is answered as any other,
and its image, label and the prediction also go out, with the answers, as a record of the
feedback topic; a label that is not 0-9 is reported in the answer and recorded nowhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fmnist import feedback, imaging
from fmnist.brokers import Message, OutMessage
from fmnist.config import Config
from fmnist.errors import ImageError
from fmnist.model.predictor import Prediction
from fmnist.serving import oip, protocol

log = logging.getLogger("fmnist.serving.handler")
_PROTOCOL_HEADERS = (protocol.REQUEST_ID, protocol.CONTENT_TYPE, protocol.SENT_AT,
                     protocol.REPLY_TO, protocol.TRACEPARENT)


class BatchPredictor(Protocol):
    """What the handler needs of a model (``model.predictor.Predictor``, or a test double)."""

    name: str
    version: str

    def start(self, pixels: np.ndarray) -> Callable[[], np.ndarray]:
        """Dispatch the forward pass of ``pixels`` [n, 28, 28]; the result returns [n, 10]
        probabilities when the pass is done."""

    def describe_many(self, probs: np.ndarray) -> Sequence[Prediction]:
        """One ranked prediction per row of ``probs``."""


@dataclass(frozen=True)
class BatchResult:
    """What one micro-batch produced: messages to publish and, per request, its outcome."""

    out: list[OutMessage]
    outcomes: list[str]  # "ok" or an error code, one per request in order
    inference_ms: float
    # (model name, version, prediction == label) per labelled request answered
    labelled: list[tuple[str, str, bool]] = field(default_factory=list)


@dataclass(frozen=True)
class Prepared:
    """A batch decoded with its forward pass dispatched; ``finish`` waits for the pass and
    builds the answers."""

    messages: list[Message]
    finish: Callable[[], BatchResult]
    model: object  # what it runs on (a hot reload may swap the handler's meanwhile)


class BatchHandler(Protocol):
    """Turns a batch of requests into the messages that answer them."""

    worker_id: str

    @property
    def model(self) -> object:
        """What the next batch will run on; a new object after each hot reload."""

    def prepare(self, messages: list[Message]) -> Prepared: ...


class PredictionHandler:
    """Answers fmnist.v1 and Open Inference Protocol requests with the model's predictions."""

    def __init__(self, cfg: Config, predictor: BatchPredictor, worker_id: str) -> None:
        self.cfg = cfg
        self.predictor = predictor  # swapped between batches by a hot reload
        self.worker_id = worker_id

    @property
    def model(self) -> object:
        return self.predictor

    def prepare(self, messages: list[Message]) -> Prepared:
        """Parse and decode the batch and dispatch its forward pass; ``finish()`` on the result
        waits for the pass and returns the messages to publish."""
        predictor = self.predictor  # read once: a hot reload swaps models between batches
        requests: list[protocol.Request] = []
        errors: dict[int, protocol.RequestError] = {}
        is_oip: list[bool] = []
        for i, message in enumerate(messages):
            request, error = protocol.parse_request(message, self.cfg.broker.response_topic)
            requests.append(request)
            is_oip.append(oip.is_oip(request.content_type, message.value))
            if error is not None:
                errors[i] = error
        pixels, spans = self._decode(requests, is_oip, errors)

        started = time.perf_counter()
        collect = None
        if len(pixels):
            try:
                collect = predictor.start(pixels)
            except Exception as exc:  # model failure: every request still gets an answer
                _inference_failed(exc, len(pixels), spans, errors)

        def finish() -> BatchResult:
            probs = np.empty((0, 10), np.float32)
            if collect is not None:
                try:
                    probs = collect()
                    assert len(probs) == len(pixels), "a batch must return one result per input"
                except Exception as exc:
                    _inference_failed(exc, len(pixels), spans, errors)
            # Dispatch to results: the forward pass, and whatever the loop did meanwhile.
            inference_ms = (time.perf_counter() - started) * 1000 if collect else 0.0
            return self._answers(requests, is_oip, errors, spans, probs, inference_ms,
                                 predictor)

        return Prepared(messages, finish, predictor)

    def _decode(self, requests: list[protocol.Request], is_oip: list[bool],
                errors: dict[int, protocol.RequestError]
                ) -> tuple[np.ndarray, dict[int, tuple[int, int, str | None]]]:
        """The pixels [rows, 28, 28] of the requests not in ``errors`` (their errors added
        there), and where each request's rows are: i -> (first row, rows, OIP id). Image
        requests are decoded together (``imaging.decode_many``), OIP tensors one by one."""
        images = [i for i in range(len(requests)) if not is_oip[i] and i not in errors]
        decoded: dict[int, np.ndarray] = {}
        if images:
            try:
                batch = imaging.decode_many([requests[i].message.value for i in images],
                                            self.cfg.imaging)
                bad = {images[index]: exc for index, exc in batch.errors}
                for i, exc in bad.items():
                    errors[i] = protocol.RequestError(exc.code, exc.message)
                good = [i for i in images if i not in bad]
                if len(good) == len(requests):  # the common batch: images only, all good
                    return batch.pixels[..., 0], {i: (i, 1, None) for i in good}
                decoded = dict(zip(good, batch.pixels[:, np.newaxis, :, :, 0], strict=True))
            except Exception:  # a decoder bug must not take the batch down: one at a time
                log.exception("batch decode failed; decoding its images one by one")
                decoded = {}
                for i in images:
                    try:
                        decoded[i] = imaging.decode(requests[i].message.value,
                                                    self.cfg.imaging)[None]
                    except Exception as exc:
                        errors[i] = _decode_error(requests[i], exc)
        rows: list[np.ndarray] = []
        spans: dict[int, tuple[int, int, str | None]] = {}
        n_rows = 0
        for i, request in enumerate(requests):
            oip_id = None
            if i in errors:
                continue
            if is_oip[i]:
                try:
                    oip_id, pixels = self._oip_tensor(request)
                except Exception as exc:
                    errors[i] = _decode_error(request, exc)
                    continue
            elif i in decoded:
                pixels = decoded[i]
            else:
                continue
            spans[i] = (n_rows, len(pixels), oip_id)
            rows.append(pixels)
            n_rows += len(pixels)
        return (np.concatenate(rows) if rows else np.empty((0, 28, 28), np.float32)), spans

    def refuse(self, messages: list[Message], error: protocol.RequestError) -> BatchResult:
        """Answer every one of ``messages`` with ``error`` (and dead-letter it) without
        decoding it or running the model: what the crash-loop guard does with a request that
        crashed workers (fmnist/serving/crashes.py)."""
        requests = [protocol.parse_request(m, self.cfg.broker.response_topic)[0]
                    for m in messages]
        return self._answers(requests, [oip.is_oip(r.content_type, r.message.value)
                                        for r in requests],
                             dict.fromkeys(range(len(requests)), error), {},
                             np.empty((0, 10), np.float32), 0.0, self.predictor)

    def _answers(self, requests: list[protocol.Request], is_oip: list[bool],
                 errors: dict[int, protocol.RequestError],
                 spans: dict[int, tuple[int, int, str | None]], probs: np.ndarray,
                 inference_ms: float, predictor: BatchPredictor) -> BatchResult:
        """One answer per request (and a dead letter per failed one), in request order."""
        model = {"name": predictor.name, "version": predictor.version}
        ranked = predictor.describe_many(probs)
        out: list[OutMessage] = []
        outcomes: list[str] = []
        labelled: list[tuple[str, str, bool]] = []
        for i, request in enumerate(requests):
            error = errors.get(i)
            body = None
            prediction = None
            noted = None
            if is_oip[i]:
                body = ({"error": f"{error.code}: {error.message}"} if error else
                        oip.response(model["name"], model["version"],
                                     spans[i][2] or request.request_id,
                                     probs[spans[i][0]:spans[i][0] + spans[i][1]]))
            elif not error:
                prediction = ranked[spans[i][0]].as_dict()
                if request.label is not None:  # the only per-request cost without a label
                    noted = self._labelled(request, prediction["label"], model, out, labelled)
            out.append(protocol.response(request, model=model, worker_id=self.worker_id,
                                         inference_ms=None if error else inference_ms,
                                         prediction=prediction, error=error, body=body,
                                         feedback=noted))
            if error:
                out.append(self._dead_letter(request, error))
            outcomes.append(error.code if error else "ok")
        return BatchResult(out, outcomes, inference_ms, labelled)

    def _labelled(self, request: protocol.Request, predicted: int, model: dict[str, str],
                  out: list[OutMessage], labelled: list[tuple[str, str, bool]]
                  ) -> dict[str, object]:
        """The feedback record of an answered request with a ``label`` header (into ``out``,
        with the answers) and what the answer says of it. A label that is not 0-9 fails
        nothing: the answer says so and nothing is recorded."""
        label = feedback.parse_wire_label(request.label)
        if label is None:
            log.warning("request %s: label %.20r is not 0-9; answered, not recorded",
                        request.request_id, request.label)
            return {"recorded": False, "error": "label must be a digit 0-9 (the class index)"}
        out.append(feedback.message(self.cfg.feedback.topic, feedback.Record(
            request.request_id, label, request.message.value, "request", protocol.now_ms(),
            predicted, model["name"], model["version"], self.worker_id)))
        labelled.append((model["name"], model["version"], predicted == label))
        return {"label": label, "correct": predicted == label, "recorded": True}

    def _dead_letter(self, request: protocol.Request, error: protocol.RequestError
                     ) -> OutMessage:
        """``protocol.dead_letter``, bounded so that the broker always takes it.

        A dead letter the broker refuses fails its whole batch, which is then delivered again
        and refused again, forever: one oversized request would stall the worker. So the letter
        keeps at most ``imaging.max_payload_bytes`` of the payload (only a request over that
        limit has more; ``dlq_payload_bytes`` says how long it was, ``dlq_source`` where the
        whole of it is) and at most ``MAX_HEADERS`` of the original headers (the protocol's
        own first), each within Pub/Sub's attribute limits (256-byte name, 1024-byte value).
        Under Kafka's default 1 MiB and Pub/Sub's 10 MB message limits.
        """
        letter = protocol.dead_letter(request, error, self.cfg.broker.dlq_topic, self.worker_id)
        cap = self.cfg.imaging.max_payload_bytes
        original = [(k, v) for k, v in letter.headers.items() if not k.startswith("dlq_")
                    and len(k.encode()) <= 256 and len(v.encode()) <= protocol.MAX_HEADER_VALUE]
        original.sort(key=lambda kv: kv[0] not in _PROTOCOL_HEADERS)  # stable: wire order
        headers = dict(original[:protocol.MAX_HEADERS])
        headers.update((k, v) for k, v in letter.headers.items() if k.startswith("dlq_"))
        headers["dlq_payload_bytes"] = str(len(letter.value))
        return OutMessage(letter.topic, letter.value[:cap], key=letter.key, headers=headers)

    def _oip_tensor(self, request: protocol.Request) -> tuple[str | None, np.ndarray]:
        """The id and pixels [k, 28, 28] of an OIP tensor body."""
        payload = request.message.value
        if len(payload) > self.cfg.imaging.max_payload_bytes:
            raise protocol.RequestError(
                "payload_too_large", f"{len(payload):,} bytes is over the limit of "
                f"{self.cfg.imaging.max_payload_bytes:,} (imaging.max_payload_bytes)")
        return oip.parse(payload)


def _decode_error(request: protocol.Request, exc: Exception) -> protocol.RequestError:
    """What a request whose decode raised ``exc`` is answered with: the client's error for a
    bad payload, ``internal_error`` (logged) for a bug, which must not take the batch down."""
    if isinstance(exc, protocol.RequestError):
        return exc
    if isinstance(exc, ImageError):
        return protocol.RequestError(exc.code, exc.message)
    log.exception("unexpected decode failure", extra={"request_id": request.request_id},
                  exc_info=exc)
    return protocol.RequestError("internal_error", f"decode failed: {exc}")


def _inference_failed(exc: Exception, n_rows: int, spans: dict[int, tuple[int, int, str | None]],
                      errors: dict[int, protocol.RequestError]) -> None:
    log.error("inference failed for a batch of %d", n_rows, exc_info=exc)
    for i in spans:
        errors[i] = protocol.RequestError("internal_error", f"inference failed: {exc}")
