"""Read what a topic holds now without taking it from anyone: the jobs' history, the model
registry's announcements and the labelled feedback are all read this way
(docs/decisions.md#job-history).

Each batch is given back as soon as it is read (on Pub/Sub a nack, so the shared subscription
``<topic>-sub`` delivers it again, to this reader or to another reading at the same time), and
reading stops once nothing not yet seen arrives for ``QUIET_S``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from fmnist.brokers.base import Broker, Message

QUIET_S = 0.5  # the topic is read once nothing new arrives for this long
MAX_IN_FLIGHT = 10_000  # messages a reader may have in hand at once (Pub/Sub flow control)
T = TypeVar("T")


def read_all(broker: Broker, topic: str, parse: Callable[[Message], T | None],
             timeout_s: float = 30.0) -> list[T]:
    """``parse`` of every message ``topic`` holds now (None skips one), each delivery once,
    in the order read."""
    reader = broker.retained_reader(topic, max_in_flight=MAX_IN_FLIGHT)
    seen: set[str] = set()
    items: list[T] = []
    try:
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = reader.next_batch(1000, timeout_s=0.1)
            if batch:
                reader.redeliver(batch)  # only looking
                fresh = [m for m in batch if m.source_id not in seen]
                if fresh:
                    seen.update(m.source_id for m in fresh)
                    items.extend(item for m in fresh if (item := parse(m)) is not None)
                    last_new = time.monotonic()
            if time.monotonic() - last_new >= QUIET_S:
                break
    finally:
        reader.close()
    return items
