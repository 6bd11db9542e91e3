"""The delivery pipeline: receive a micro-batch, handle it, publish the answers, wait for the
broker to confirm them, then commit the requests.

At-least-once, in this order and no other: responses (and dead letters) are published and
confirmed by the broker *before* their requests are committed/acked. If publishing fails the
requests are handed back for redelivery, never committed, so a worker killed at any instant
loses nothing; the price is that a request may be answered twice (same request_id).

Three batches at a time, so that the loop's thread never sits waiting
(docs/decisions.md#pipelined-serve-loop): it fetches and prepares batch n+1 (its forward pass
runs on XLA's threads); meanwhile it sends the answers of batch n; then it waits for the
broker to confirm batch n-1's. Confirmed requests are committed together, at most
``serve.commit_every_ms`` later (docs/decisions.md#batched-commits). Batches are confirmed and
committed in the order they were fetched, and a failed confirmation hands back *every* batch
not yet confirmed, so a commit never covers a request whose answer the broker has not
confirmed.

It knows brokers only through the ``Consumer``/``Producer`` interface, and requests only
through its ``BatchHandler``: unit tests drive it with in-memory fakes, integration tests with
both real brokers.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fmnist.brokers import Consumer, Message, OutMessage, Producer
from fmnist.brokers.base import Confirmation
from fmnist.config import Config
from fmnist.errors import BrokerError
from fmnist.serving.handler import BatchHandler, BatchResult, Prepared

log = logging.getLogger("fmnist.serving.pipeline")
IDLE_POLL_S = 0.2  # the longest the loop waits for a request before it looks around again
# Called once per confirmed batch with its requests and result (metrics, tests).
Observer = Callable[[list[Message], BatchResult], None]


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
    # time.monotonic() since when the loop waits on the broker (a batch's answers confirmed, a
    # commit), None while it does not. Readiness reads it: a broker that stops answering during
    # such a wait holds the loop there, where the consumer's own reports are not served.
    broker_wait_since: float | None = None

    def rate(self) -> float:
        return self.processed / max(time.monotonic() - self.started, 1e-9)

    def latency_ms(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def record(self, messages: list[Message], outcomes: list[str]) -> None:
        now = time.time()
        self.batches += 1
        self.last_batch = len(messages)
        self.processed += len(messages)
        self.latencies_ms.extend([(now - m.received_at) * 1000 for m in messages])
        ok = outcomes.count("ok")
        self.ok += ok
        if ok < len(outcomes):  # errors are rare: only then look at each outcome
            for outcome in outcomes:
                if outcome != "ok":
                    self.errors += 1
                    self.error_codes[outcome] = self.error_codes.get(outcome, 0) + 1


@dataclass(frozen=True)
class InFlight:
    """A batch whose answers were sent but not yet confirmed, so its requests are not
    committed."""

    messages: list[Message]
    result: BatchResult
    confirmation: Confirmation


class Pipeline:
    def __init__(self, cfg: Config, handler: BatchHandler, stats: Stats,
                 ensure_topics: Callable[[list[str]], None],
                 observers: list[Observer] | None = None) -> None:
        self.cfg = cfg
        self.handler = handler
        self.stats = stats
        self.observers = observers if observers is not None else []
        self._ensure_topics = ensure_topics
        self._known_topics: set[str] = set()
        self.prepared: Prepared | None = None  # its forward pass runs while we send others
        self._in_flight: deque[InFlight] = deque()  # oldest first
        # Answered and confirmed, not yet committed: commits are batched (serve.commit_every_ms)
        self._confirmed: list[Message] = []
        self._commit_due: float | None = None  # time.monotonic() by which to commit them

    def turn(self, consumer: Consumer, producer: Producer) -> int:
        """One turn: fetch a batch and dispatch its forward pass; while that runs, answer
        (send) the batch prepared before it; then confirm the batch sent before that one, and
        commit what is confirmed when the commit is due. A batch that is not full is answered
        in the same turn. Returns the new batch's size; 0 when nothing came, and then
        everything is answered and confirmed (and committed once due; ``flush`` commits at
        once)."""
        self.stats.last_loop = time.monotonic()
        max_batch = self.cfg.serve.max_batch_size
        # With work under way, look for more without waiting: if nothing is there, finish
        # that work now rather than leaving it for the idle timeout.
        busy = self.prepared is not None or bool(self._in_flight)
        idle_s = IDLE_POLL_S if self._commit_due is None else \
            min(IDLE_POLL_S, max(0.0, self._commit_due - time.monotonic()))
        messages = consumer.next_batch(max_batch, timeout_s=0.0 if busy else idle_s)
        if messages:
            # A batch is what had arrived when the first request was taken: waiting for more
            # would only delay it, as more arrive while it is handled (serve.max_wait_ms 0;
            # docs/decisions.md#no-idle-waiting). A positive max_wait_ms waits that long to fill.
            deadline = time.monotonic() + self.cfg.serve.max_wait_ms / 1000
            while len(messages) < max_batch and (left := deadline - time.monotonic()) > 0:
                more = consumer.next_batch(max_batch - len(messages), timeout_s=left)
                if not more:
                    break
                messages.extend(more)
        earlier = self.prepared
        self.prepared = self.handler.prepare(messages) if messages else None
        if earlier is not None:
            self._send(consumer, producer, earlier)
        if self.prepared is not None and len(messages) < max_batch:
            # Not a full batch: nothing else is waiting, so nothing to overlap with. Answer it
            # now; deferring it would add the next fetch (a few ms when idle) to its latency.
            prepared, self.prepared = self.prepared, None
            self._send(consumer, producer, prepared)
        self.settle(consumer, keep=1 if messages else 0)
        self._commit(consumer, force=False)
        return len(messages)

    def flush(self, consumer: Consumer, producer: Producer) -> None:
        """Answer the batch prepared, then confirm and commit everything sent."""
        prepared, self.prepared = self.prepared, None
        if prepared is not None:
            self._send(consumer, producer, prepared)
        self.settle(consumer)
        self._commit(consumer, force=True)

    def reset(self) -> None:
        """Forget everything under way after the broker failed: none of it is committed, so
        the broker delivers it again (what was confirmed is answered: a duplicate, not a
        loss)."""
        self._in_flight.clear()
        self.prepared = None
        self._confirmed.clear()
        self._commit_due = None

    def settle(self, consumer: Consumer, keep: int = 0) -> None:
        """Wait for the broker to confirm the batches in flight, oldest first, until ``keep``
        are left; their requests join those to commit. One that was not confirmed is handed back
        for redelivery with every batch after it (BrokerError is raised)."""
        while len(self._in_flight) > keep:
            batch = self._in_flight[0]
            self.stats.broker_wait_since = time.monotonic()
            try:
                batch.confirmation.wait()
            except BrokerError:
                self._hand_back(consumer, [])
                raise
            finally:
                self.stats.broker_wait_since = None
            self._in_flight.popleft()
            self._confirmed.extend(batch.messages)
            if self._commit_due is None:
                self._commit_due = time.monotonic() + self.cfg.serve.commit_every_ms / 1000
            self.stats.record(batch.messages, batch.result.outcomes)
            for observe in self.observers:
                observe(batch.messages, batch.result)

    def _send(self, consumer: Consumer, producer: Producer, prepared: Prepared) -> None:
        result = prepared.finish()
        try:
            self._ensure_reply_topics(result.out)
            confirmation = producer.send(result.out, timeout_s=30)
        except BrokerError:
            self._hand_back(consumer, prepared.messages)
            raise
        self._in_flight.append(InFlight(prepared.messages, result, confirmation))

    def _commit(self, consumer: Consumer, force: bool) -> None:
        """Commit the confirmed requests once the oldest has waited ``serve.commit_every_ms``
        (or a batch's worth is waiting, or ``force``). A commit is a round trip whatever it
        covers; waiting costs duplicates only: a worker killed before the commit leaves these
        requests to be answered again, never lost, since their answers are already confirmed
        (docs/decisions.md#batched-commits)."""
        if not self._confirmed:
            return
        if not (force or len(self._confirmed) >= self.cfg.serve.max_batch_size
                or time.monotonic() >= (self._commit_due or 0.0)):
            return
        confirmed, self._confirmed, self._commit_due = self._confirmed, [], None
        self.stats.broker_wait_since = time.monotonic()
        try:
            consumer.commit(confirmed)
        finally:
            self.stats.broker_wait_since = None

    def _hand_back(self, consumer: Consumer, messages: list[Message]) -> None:
        """Never commit what was not answered: redeliver these, every batch in flight and the
        batch prepared."""
        unconfirmed = [m for batch in self._in_flight for m in batch.messages] + messages
        if self.prepared is not None:
            unconfirmed += self.prepared.messages
        self._in_flight.clear()
        self.prepared = None
        answered = len(self._confirmed)
        try:  # what was confirmed is answered: commit it, or its redelivery is a duplicate
            self._commit(consumer, force=True)
        except BrokerError as exc:
            log.warning("could not commit %d answered request(s) (%s); they may be answered "
                        "again", answered, exc.message)
        consumer.redeliver(unconfirmed)
        self.stats.redelivered += len(unconfirmed)

    def _ensure_reply_topics(self, out: list[OutMessage]) -> None:
        """Per-client reply topics (res_predict.<x>) are created on first use."""
        new = {m.topic for m in out} - self._known_topics
        if new and self.cfg.broker.create_topics:
            self._ensure_topics(sorted(new))
        self._known_topics |= new
