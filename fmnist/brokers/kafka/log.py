"""Kafka as a keyed log for the model store (``fmnist.registry.store.KafkaStore``): append
records to partition 0 and learn their offsets, read a range of offsets back in order.

Only single-partition topics are used this way: one partition is one order, and an offset
names a record for as long as compaction keeps it (a key never reused, always)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from fmnist.brokers.kafka import errors, settings
from fmnist.brokers.kafka.broker import KafkaBroker
from fmnist.errors import BrokerError, BrokerTimeout

COMPACTED = {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1"}


@dataclass(frozen=True)
class Record:
    key: str
    value: bytes | None  # None: a tombstone
    offset: int


def ensure_compacted(broker: KafkaBroker, topics: list[str]) -> None:
    """Single-partition compacted topics: the latest value of each key is kept forever."""
    broker.ensure_topics(topics, partitions=1, topic_config=COMPACTED)


def append(broker: KafkaBroker, topic: str, items: list[tuple[str, bytes]],
           timeout_s: float) -> list[int]:
    """Send ``(key, value)`` pairs to partition 0 in order (the idempotent producer keeps it);
    return their offsets once the broker confirmed every one."""
    producer = broker.shared_producer()
    offsets: dict[int, int] = {}
    failures: list[str] = []

    def report(index: int) -> Any:
        def done(err: Any, msg: Any) -> None:
            if err is not None:
                failures.append(str(err))
            else:
                offsets[index] = int(msg.offset())
        return done

    try:
        for i, (key, value) in enumerate(items):
            producer.produce(topic, value, key=key.encode(), partition=0, on_delivery=report(i))
            producer.poll(0)
        left = producer.flush(timeout_s)
    except (KafkaException, BufferError) as exc:
        raise broker.error(f"write to {topic}", exc) from None
    if failures or left or len(offsets) != len(items):
        raise BrokerError(f"Kafka at {broker.address} did not confirm the write to {topic}: "
                          f"{'; '.join(failures[:3]) or 'timed out'}.",
                          "Is the broker up? Writing again is safe.")
    return [offsets[i] for i in range(len(items))]


def read(broker: KafkaBroker, topic: str, first: int | None = None, last: int | None = None,
         timeout_s: float = 30.0) -> Iterator[Record]:
    """The records of partition 0 from offset ``first`` (else the beginning) to ``last`` (else
    the end as it is now), in order."""
    consumer = Consumer({**broker.client_config(),
                         **settings.consumer_config(broker.cfg.kafka, None)})
    deadline = time.monotonic() + timeout_s
    try:
        low, high = _watermarks(broker, consumer, topic, deadline)
        end = int(high) if last is None else min(int(high), last + 1)
        start = int(low) if first is None else max(first, int(low))
        if end <= start:
            return
        consumer.assign([TopicPartition(topic, 0, start if start > 0 else OFFSET_BEGINNING)])
        while True:
            msg = consumer.poll(0.5)
            if msg is None:
                if time.monotonic() > deadline:
                    raise BrokerTimeout(f"Kafka at {broker.address} did not deliver {topic} up "
                                        f"to offset {end - 1} within {timeout_s:g} s.",
                                        "Is the broker overloaded? Try again.")
                continue
            if msg.error():
                raise broker.error(f"read {topic}", KafkaException(msg.error()))
            offset = int(msg.offset() or 0)
            yield Record((msg.key() or b"").decode(errors="replace"), msg.value(), offset)
            if offset >= end - 1:
                return
    finally:
        consumer.close()


def _watermarks(broker: KafkaBroker, consumer: Consumer, topic: str, deadline: float
                ) -> tuple[int, int]:
    """Partition 0's low and high watermarks. A topic created a moment ago may still answer
    NOT_LEADER_FOR_PARTITION to a fresh client (``errors.SETTLING``) after the admin client saw
    its leader; that is asked again until ``deadline``."""
    while True:
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, 0), timeout=max(deadline - time.monotonic(), 0.1))
            return int(low), int(high)
        except KafkaException as exc:
            if errors.code_of(exc) not in errors.SETTLING or time.monotonic() >= deadline:
                raise broker.error(f"read {topic}", exc) from None
        time.sleep(0.1)
