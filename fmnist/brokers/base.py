"""The one small interface both brokers implement.

A worker needs four things from a broker: receive a batch of requests, publish responses and
learn when the broker has confirmed them, acknowledge (commit) requests only after that, and
give requests back for redelivery when publishing failed. Sending and confirming are separate
calls (``send`` returns a ``Confirmation``) so that a worker can fetch and predict the next batch
while the broker confirms the last one. Everything vendor-specific (Kafka
partitions and offsets, Pub/Sub ack ids and flow control) stays inside the adapter modules;
the vendor's message type never leaves them.

Only types live here; ``fmnist.brokers`` maps a broker's name to its adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


# Messages are made per request on the serve loop's thread: slots and no frozen __init__ (which
# sets each field through object.__setattr__) make one in 0.6 us instead of 1.7; nothing
# changes one after it is made (docs/decisions.md#per-batch-bookkeeping).
@dataclass(slots=True)
class Message:
    """One received message, broker-neutral; not changed once made."""

    value: bytes
    headers: dict[str, str]  # Kafka headers (decoded as UTF-8) / Pub/Sub attributes
    key: str | None
    topic: str
    # A stable name of this delivery: "topic/partition/offset" (Kafka) or the Pub/Sub message id.
    # Requests without a request_id header are answered under an id derived from it.
    source_id: str
    broker_time_ms: int | None  # when the broker stored it, if it says
    received_at: float  # time.time() when our consumer handed it out
    handle: Any = field(default=None, compare=False, repr=False)  # opaque ack token


@dataclass(slots=True)
class OutMessage:  # not changed once made; see Message
    topic: str
    value: bytes
    key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class Consumer(Protocol):
    def next_batch(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Up to ``max_messages``; returns early with what it has once ``timeout_s`` passes."""

    def commit(self, messages: list[Message]) -> None:
        """Acknowledge these messages: they will not be delivered again to this group."""

    def redeliver(self, messages: list[Message]) -> None:
        """Give these messages back (publish failed): they are delivered again, none skipped."""

    def close(self) -> None: ...


@runtime_checkable
class LagReporting(Protocol):
    """A consumer that knows how far behind the end of its topic it reads (Kafka's)."""

    def lag(self) -> dict[tuple[str, int], int]:
        """Messages behind the end, per (topic, partition) it reads now; call it from the
        thread that reads."""


@runtime_checkable
class OutageReporting(Protocol):
    """A consumer that knows when its broker cannot be reached although nothing has failed yet:
    an idle consumer only waits, and its client library reconnects on its own, so no call of
    ours raises while the broker is down. The Kafka and Pub/Sub consumers implement it."""

    def outage(self) -> str | None:
        """Why requests sent now would not be answered (the broker unreachable, the
        subscription gone), or None when nothing says so. Cheap: called every loop turn."""


class Confirmation(Protocol):
    def wait(self) -> None:
        """Block until the broker has confirmed every message of the ``send`` that made this
        (at most its ``timeout_s`` after that send); raise BrokerError if any was not."""


class Producer(Protocol):
    def send(self, messages: list[OutMessage], timeout_s: float) -> Confirmation:
        """Hand all to the client library and return at once; ``wait`` on the result."""

    def publish(self, messages: list[OutMessage], timeout_s: float) -> None:
        """``send(messages, timeout_s).wait()``: send all and block until each is confirmed."""

    def close(self) -> None: ...


class Broker(Protocol):
    name: str
    address: str  # where it is, as the user configured it (for messages and benchmarks)

    def check(self, timeout_s: float) -> None:
        """Raise BrokerError (naming the address and how to start it) if unreachable."""

    def ensure_topics(self, topics: list[str]) -> None:
        """Create the topics (and for Pub/Sub their default subscriptions) that are missing."""

    def consumer(self, topic: str, group: str | None = None, from_beginning: bool = False,
                 max_in_flight: int = 1000, max_hold_s: float | None = None) -> Consumer:
        """A consumer of ``topic``.

        ``group`` given: a shared, committed position (Kafka consumer group, or the named Pub/Sub
        subscription) so several workers split the load and a restart resumes where the last
        commit left off. A new Kafka group starts at the earliest retained message; a Pub/Sub
        subscription holds what was published since it was created, which is why
        ``ensure_topics`` creates ``<topic>-sub`` together with each topic.
        ``group`` None: a private reader that sees only messages published after it was created
        (or all retained ones with ``from_beginning``), used by clients waiting for answers.

        ``max_hold_s``: how long a live member may hold a message it has not committed before
        the broker gives it to another member (Kafka's ``max.poll.interval.ms``, Pub/Sub's
        maximum lease); None keeps the adapter's default (minutes). A job worker holds its job
        for as long as the job runs; on Pub/Sub such a member pulls only when it has room.
        """

    def producer(self) -> Producer: ...

    def worker_group(self, topic: str | None = None) -> str:
        """The ``group`` the workers of ``topic`` share: for the request topic (None) the
        configured one, for another topic (jobs) one named after it."""

    def retained_reader(self, topic: str, max_in_flight: int = 1000) -> Consumer:
        """A reader of what ``topic`` holds from before it was opened. ``commit`` marks what
        was shown as handled where the broker keeps it for one reader only (Pub/Sub's shared
        subscription); ``redeliver`` leaves it for the next reader."""

    def delete_topics(self, topics: list[str]) -> None:
        """Delete these topics (and subscriptions made for them); missing ones are fine."""

    def close(self) -> None: ...
