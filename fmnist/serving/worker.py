"""The serve loop: receive a micro-batch, predict in one forward pass, publish, then commit.

At-least-once, in this order and no other: responses (and dead letters) are published and
confirmed by the broker *before* their requests are committed/acked. If publishing fails the
requests are handed back for redelivery, never committed, so a worker killed at any instant
loses nothing; the price is that a request may be answered twice (same request_id).

Pipelined, three batches at a time, so that the loop's thread never sits waiting: it fetches
and decodes batch n+1 and dispatches its forward pass (JAX runs it on XLA's threads); while that
runs it builds and sends the answers of batch n; then it waits for the broker to confirm batch
n-1's answers. Waiting for the forward pass and for a round trip per batch was more than half of
the loop's wall time. Confirmed requests are committed together, at most
``serve.commit_every_ms`` later (a commit is a round trip whatever it covers). Batches are
confirmed and committed in the order they were fetched, and a failed confirmation hands back
*every* batch not yet confirmed, so a commit never covers a request whose answer the broker has
not confirmed.

Every request gets exactly one answer per delivery: a prediction, or an error response plus a
dead-letter record. A bad request never takes the worker down or holds up the others in its
batch (the Ray Serve rule: a batch returns as many results as it got inputs).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fmnist import imaging
from fmnist.brokers.base import Broker, Confirmation, Consumer, Message, OutMessage, Producer
from fmnist.config import Config
from fmnist.errors import BrokerError, ImageError
from fmnist.serving import oip, protocol

log = logging.getLogger("fmnist.serving.worker")
_PROTOCOL_HEADERS = (protocol.REQUEST_ID, protocol.CONTENT_TYPE, protocol.SENT_AT,
                     protocol.REPLY_TO, protocol.TRACEPARENT)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def group_for(broker_name: str, cfg: Config) -> str:
    """Kafka: the consumer group; Pub/Sub: the shared request subscription."""
    return cfg.kafka.group_id if broker_name == "kafka" else cfg.pubsub.request_subscription


@dataclass
class Stats:
    """Counters for the status line, /metrics and tests. Updated by the serve loop only."""

    started: float = field(default_factory=time.monotonic)
    processed: int = 0
    ok: int = 0
    errors: int = 0
    batches: int = 0
    last_batch: int = 0
    redelivered: int = 0
    broker_state: str = "connecting"
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    error_codes: dict[str, int] = field(default_factory=dict)
    last_loop: float = field(default_factory=time.monotonic)

    def rate(self) -> float:
        return self.processed / max(time.monotonic() - self.started, 1e-9)

    def latency_ms(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None


@dataclass(frozen=True)
class BatchResult:
    """What one micro-batch produced: messages to publish and, per request, its outcome."""

    out: list[OutMessage]
    outcomes: list[str]  # "ok" or an error code, one per request in order
    inference_ms: float


@dataclass(frozen=True)
class InFlight:
    """A batch whose answers were sent but not yet confirmed, so its requests are not
    committed."""

    messages: list[Message]
    result: BatchResult
    confirmation: Confirmation


@dataclass(frozen=True)
class Prepared:
    """A batch decoded with its forward pass dispatched; ``finish`` waits for the pass and
    builds the answers."""

    messages: list[Message]
    finish: Callable[[], BatchResult]
    predictor: Any  # the model it runs on (a hot reload may swap the worker's meanwhile)


class Worker:
    def __init__(self, cfg: Config, broker: Broker, predictor: Any, group: str,
                 worker_id: str | None = None, observers: list[Callable[..., None]] | None = None,
                 freeze_heap: bool = False) -> None:
        self.cfg = cfg
        self.broker = broker
        self.predictor = predictor
        self.group = group
        self.worker_id = worker_id or cfg.serve.worker_id or default_worker_id()
        self.stats = Stats()
        self.stop_event = threading.Event()
        self.observers = observers or []
        self._known_topics: set[str] = set()
        self._prepared: Prepared | None = None  # its forward pass runs while we send others
        self._in_flight: deque[InFlight] = deque()  # oldest first
        # Answered and confirmed, not yet committed: commits are batched (serve.commit_every_ms)
        self._confirmed: list[Message] = []
        self._commit_due: float | None = None  # time.monotonic() by which to commit them
        # serve: the model's objects are kept out of the garbage collector's scans
        # (runtime.freeze_heap), again after each hot reload, between two batches.
        self._freeze_heap = freeze_heap
        self._frozen_with: Any = None

    # -- pure part: a batch of messages in, messages to publish out -------------------------

    def prepare(self, messages: list[Message]) -> Prepared:
        """Parse and decode the batch and dispatch its forward pass; ``finish()`` on the result
        waits for the pass and returns the messages to publish."""
        cfg = self.cfg
        predictor = self.predictor  # read once: a hot reload swaps models between batches
        requests: list[protocol.Request] = []
        errors: dict[int, protocol.RequestError] = {}
        rows: list[np.ndarray] = []
        spans: dict[int, tuple[int, int, str | None]] = {}  # i -> (first row, rows, OIP id)
        n_rows = 0
        for i, message in enumerate(messages):
            request, error = protocol.parse_request(message, cfg.broker.response_topic)
            requests.append(request)
            if error is None:
                try:
                    oip_id, pixels = self._decode(request)
                    spans[i] = (n_rows, len(pixels), oip_id)
                    rows.append(pixels)
                    n_rows += len(pixels)
                    continue
                except protocol.RequestError as exc:
                    error = exc
                except ImageError as exc:
                    error = protocol.RequestError(exc.code, exc.message)
                except Exception as exc:  # a decoder bug must not take the batch down
                    log.exception("unexpected decode failure",
                                  extra={"request_id": request.request_id})
                    error = protocol.RequestError("internal_error", f"decode failed: {exc}")
            errors[i] = error

        started = time.perf_counter()
        collect = None
        if rows:
            try:
                collect = predictor.start(np.concatenate(rows))
            except Exception as exc:  # model failure: every request still gets an answer
                self._inference_failed(exc, n_rows, spans, errors)

        def finish() -> BatchResult:
            probs = np.empty((0, 10), np.float32)
            if collect is not None:
                try:
                    probs = collect()
                    assert len(probs) == n_rows, "a batch must return one result per input"
                except Exception as exc:
                    self._inference_failed(exc, n_rows, spans, errors)
            # Dispatch to results: the forward pass, and whatever the loop did meanwhile.
            inference_ms = (time.perf_counter() - started) * 1000 if rows else 0.0
            return self._answers(requests, errors, spans, probs, inference_ms, predictor)

        return Prepared(messages, finish, predictor)

    def _inference_failed(self, exc: Exception, n_rows: int,
                          spans: dict[int, tuple[int, int, str | None]],
                          errors: dict[int, protocol.RequestError]) -> None:
        log.error("inference failed for a batch of %d", n_rows, exc_info=exc)
        for i in spans:
            errors[i] = protocol.RequestError("internal_error", f"inference failed: {exc}")

    def _answers(self, requests: list[protocol.Request], errors: dict[int, protocol.RequestError],
                 spans: dict[int, tuple[int, int, str | None]], probs: np.ndarray,
                 inference_ms: float, predictor: Any) -> BatchResult:
        """One answer per request (and a dead letter per failed one), in request order."""
        model = {"name": predictor.name, "version": predictor.version}
        ranked = predictor.describe_many(probs)
        out: list[OutMessage] = []
        outcomes: list[str] = []
        for i, request in enumerate(requests):
            error = errors.get(i)
            is_oip = oip.is_oip(request.content_type, request.message.value)
            body = None
            prediction = None
            if is_oip:
                body = ({"error": f"{error.code}: {error.message}"} if error else
                        oip.response(model["name"], model["version"],
                                     spans[i][2] or request.request_id,
                                     probs[spans[i][0]:spans[i][0] + spans[i][1]]))
            elif not error:
                prediction = ranked[spans[i][0]].as_dict()
            out.append(protocol.response(request, model=model, worker_id=self.worker_id,
                                         inference_ms=None if error else inference_ms,
                                         prediction=prediction, error=error, body=body))
            if error:
                out.append(self._dead_letter(request, error))
            outcomes.append(error.code if error else "ok")
        return BatchResult(out, outcomes, inference_ms)

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

    def _decode(self, request: protocol.Request) -> tuple[str | None, np.ndarray]:
        """Pixels [k, 28, 28] of one request: an image file, or an OIP tensor body."""
        payload = request.message.value
        if oip.is_oip(request.content_type, payload):
            if len(payload) > self.cfg.imaging.max_payload_bytes:
                raise protocol.RequestError(
                    "payload_too_large", f"{len(payload):,} bytes is over the limit of "
                    f"{self.cfg.imaging.max_payload_bytes:,} (imaging.max_payload_bytes)")
            return oip.parse(payload)
        return None, imaging.decode(payload, self.cfg.imaging)[None]

    # -- the loop ---------------------------------------------------------------------------

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        """Serve until ``stop()``; survive broker outages with capped exponential backoff."""
        backoff = 0.5
        consumer: Consumer | None = None
        producer: Producer | None = None
        while not self.stop_event.is_set():
            try:
                if consumer is None or producer is None:
                    self._connect_state("connecting")
                    self.broker.check(self.cfg.broker.connect_timeout_s)
                    if self.cfg.broker.create_topics:
                        self.broker.ensure_topics([self.cfg.broker.request_topic,
                                                   self.cfg.broker.response_topic,
                                                   self.cfg.broker.dlq_topic])
                    producer = self.broker.producer()
                    consumer = self.broker.consumer(
                        self.cfg.broker.request_topic, group=self.group,
                        max_in_flight=4 * self.cfg.serve.max_batch_size)
                    self._connect_state("connected")
                    backoff = 0.5
                self.serve_once(consumer, producer)
            except BrokerError as exc:
                # What was in flight is not committed: the broker delivers it again to the
                # consumer that replaces this one (or to another member of the group).
                self._in_flight.clear()
                self._prepared = None
                self._confirmed.clear()  # answered; their redelivery is a duplicate, not a loss
                self._commit_due = None
                self._connect_state(f"unavailable, retrying in {backoff:.1f} s")
                log.warning("broker problem: %s; retrying in %.1f s", exc.message, backoff)
                for closable in (consumer, producer):
                    try:
                        if closable is not None:
                            closable.close()
                    except Exception:  # closing a broken client may fail too
                        pass
                consumer = producer = None
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        try:
            if consumer is not None and producer is not None:
                self.flush(consumer, producer)  # drain: the last batches answered, committed
        except BrokerError as exc:
            log.warning("the last batch was not confirmed (%s); it will be delivered again",
                        exc.message)
        finally:
            for closable in (consumer, producer):
                if closable is not None:
                    closable.close()

    def serve_once(self, consumer: Consumer, producer: Producer) -> int:
        """One turn of the pipeline: fetch a batch and dispatch its forward pass; while that
        runs, answer (send) the batch prepared before it; then confirm the batch sent before
        that one, and commit what is confirmed when the commit is due. A batch that is not full
        is answered in the same turn. Returns the new batch's size; 0 when nothing came, and
        then everything is answered and confirmed (and committed once due; ``flush`` commits
        at once)."""
        self.stats.last_loop = time.monotonic()
        max_batch = self.cfg.serve.max_batch_size
        # With work under way, look for more without waiting: if nothing is there, finish
        # that work now rather than leaving it for the idle timeout.
        busy = self._prepared is not None or bool(self._in_flight)
        idle_s = 0.2 if self._commit_due is None else \
            min(0.2, max(0.0, self._commit_due - time.monotonic()))
        messages = consumer.next_batch(max_batch, timeout_s=0.0 if busy else idle_s)
        if messages:
            # The first request is here; wait at most max_wait_ms for the batch to fill.
            deadline = time.monotonic() + self.cfg.serve.max_wait_ms / 1000
            while len(messages) < max_batch and (left := deadline - time.monotonic()) > 0:
                more = consumer.next_batch(max_batch - len(messages), timeout_s=left)
                if not more:
                    break
                messages.extend(more)
        earlier, self._prepared = self._prepared, self.prepare(messages) if messages else None
        if earlier is not None:
            self._send(consumer, producer, earlier)
        if self._prepared is not None and len(messages) < max_batch:
            # Not a full batch: nothing else is waiting, so nothing to overlap with. Answer it
            # now; deferring it would add the next fetch (a few ms when idle) to its latency.
            prepared, self._prepared = self._prepared, None
            self._send(consumer, producer, prepared)
        self._maybe_freeze_heap()
        self.settle(consumer, keep=1 if messages else 0)
        self._commit(consumer, force=False)
        return len(messages)

    def flush(self, consumer: Consumer, producer: Producer) -> None:
        """Answer the batch prepared, then confirm and commit everything sent."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            self._send(consumer, producer, prepared)
        self.settle(consumer)
        self._commit(consumer, force=True)

    def _send(self, consumer: Consumer, producer: Producer, prepared: Prepared) -> None:
        result = prepared.finish()
        try:
            self._ensure_reply_topics(result.out)
            confirmation = producer.send(result.out, timeout_s=30)
        except BrokerError:
            self._hand_back(consumer, prepared.messages)
            raise
        self._in_flight.append(InFlight(prepared.messages, result, confirmation))

    def settle(self, consumer: Consumer, keep: int = 0) -> None:
        """Wait for the broker to confirm the batches in flight, oldest first, until ``keep``
        are left; their requests join those to commit. One that was not confirmed is handed back
        for redelivery with every batch after it (BrokerError is raised)."""
        while len(self._in_flight) > keep:
            batch = self._in_flight[0]
            try:
                batch.confirmation.wait()
            except BrokerError:
                self._hand_back(consumer, [])
                raise
            self._in_flight.popleft()
            self._confirmed.extend(batch.messages)
            if self._commit_due is None:
                self._commit_due = time.monotonic() + self.cfg.serve.commit_every_ms / 1000
            self._record(batch.messages, batch.result)

    def _commit(self, consumer: Consumer, force: bool) -> None:
        """Commit the confirmed requests once the oldest has waited ``serve.commit_every_ms``
        (or a batch's worth is waiting, or ``force``).

        A commit is a broker round trip (3 ms median at 200 req/s here, on the loop's thread)
        that is the same for one request or a thousand. Committing every batch made the loop
        busy long enough for the next request to wait behind it; the price of waiting is
        duplicates only: a worker killed before the commit leaves these requests to be answered
        again, never lost, since their answers are already confirmed.
        """
        if not self._confirmed:
            return
        if not (force or len(self._confirmed) >= self.cfg.serve.max_batch_size
                or time.monotonic() >= (self._commit_due or 0.0)):
            return
        confirmed, self._confirmed, self._commit_due = self._confirmed, [], None
        consumer.commit(confirmed)

    def _hand_back(self, consumer: Consumer, messages: list[Message]) -> None:
        """Never commit what was not answered: redeliver these, every batch in flight and the
        batch prepared."""
        unconfirmed = [m for batch in self._in_flight for m in batch.messages] + messages
        if self._prepared is not None:
            unconfirmed += self._prepared.messages
        self._in_flight.clear()
        self._prepared = None
        answered = len(self._confirmed)
        try:  # what was confirmed is answered: commit it, or its redelivery is a duplicate
            self._commit(consumer, force=True)
        except BrokerError as exc:
            log.warning("could not commit %d answered request(s) (%s); they may be answered "
                        "again", answered, exc.message)
        consumer.redeliver(unconfirmed)
        self.stats.redelivered += len(unconfirmed)

    def _maybe_freeze_heap(self) -> None:
        """``runtime.freeze_heap`` at start and after a hot reload, once no batch holds the model
        swapped out (frozen, its reference cycles could never be freed)."""
        if not self._freeze_heap or self._frozen_with is self.predictor:
            return
        if self._prepared is not None and self._prepared.predictor is not self.predictor:
            return
        from fmnist.runtime import freeze_heap

        self._frozen_with = self.predictor  # first: this was the last reference to the old
        freeze_heap()

    def _ensure_reply_topics(self, out: list[OutMessage]) -> None:
        """Per-client reply topics (res_predict.<x>) are created on first use."""
        new = {m.topic for m in out} - self._known_topics
        if new and self.cfg.broker.create_topics:
            self.broker.ensure_topics(sorted(new))
        self._known_topics |= new

    def _record(self, messages: list[Message], result: BatchResult) -> None:
        stats = self.stats
        now = time.time()
        stats.batches += 1
        stats.last_batch = len(messages)
        stats.processed += len(messages)
        for message, outcome in zip(messages, result.outcomes, strict=True):
            stats.latencies_ms.append((now - message.received_at) * 1000)
            if outcome == "ok":
                stats.ok += 1
            else:
                stats.errors += 1
                stats.error_codes[outcome] = stats.error_codes.get(outcome, 0) + 1
        for observe in self.observers:
            observe(messages, result)

    def _connect_state(self, state: str) -> None:
        self.stats.broker_state = state
