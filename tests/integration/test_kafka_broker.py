"""What only Kafka does: partitions, consumer groups, offsets, rebalances.

Runs against the real broker (`scripts/brokers up` or `scripts/kafka.sh up`); each test owns
uuid-named topics and groups.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from fmnist import config
from fmnist.brokers.base import Message, OutMessage
from fmnist.brokers.kafka import KafkaBroker
from fmnist.errors import BrokerError
from fmnist.testing.waiting import poll_until
from tests.integration.conftest import drain, unique

pytestmark = pytest.mark.kafka



def offsets(messages: list[Message]) -> list[int]:
    return sorted(int(m.source_id.rsplit("/", 1)[1]) for m in messages)


def test_topics_get_the_configured_partitions_and_creation_is_idempotent(
        kafka: KafkaBroker) -> None:
    topic = unique("req")
    kafka.ensure_topics([topic, topic])
    kafka.ensure_topics([topic])
    assert kafka.partitions(topic) == list(range(kafka.cfg.kafka.partitions))


def test_messages_carry_key_source_id_and_the_broker_time(kafka: KafkaBroker) -> None:
    topic = unique("req")
    kafka.ensure_topics([topic])
    before = time.time() * 1000
    kafka.producer().publish([OutMessage(topic, b"v", key="k", headers={"h": "ü"})], timeout_s=10)
    (m,) = drain(kafka.consumer(topic, group=unique("g")), 1)
    assert (m.value, m.key, m.headers) == (b"v", "k", {"h": "ü"})
    _, partition, offset = m.source_id.split("/")
    assert m.source_id == f"{topic}/{int(partition)}/0" and offset == "0"
    assert m.broker_time_ms is not None and before - 1000 <= m.broker_time_ms <= time.time() * 1000


def test_commit_keeps_only_what_was_committed_across_a_restart(kafka: KafkaBroker) -> None:
    topic, group = unique("req"), unique("g")
    kafka.ensure_topics([topic])
    # one key: one partition, so offsets 0..9 are in order
    kafka.producer().publish([OutMessage(topic, str(i).encode(), key="same") for i in range(10)],
                             timeout_s=10)
    first = kafka.consumer(topic, group=group)
    got = drain(first, 10)
    assert offsets(got) == list(range(10))
    first.commit([m for m in got if offsets([m])[0] in (1, 3)])  # the highest one counts
    first.close()
    again = kafka.consumer(topic, group=group)
    assert offsets(drain(again, 6)) == [4, 5, 6, 7, 8, 9]
    assert again.next_batch(10, timeout_s=0.5) == []
    again.close()


def test_redeliver_seeks_back_to_the_lowest_offset_given(kafka: KafkaBroker) -> None:
    topic = unique("req")
    kafka.ensure_topics([topic])
    kafka.producer().publish([OutMessage(topic, str(i).encode(), key="same") for i in range(5)],
                             timeout_s=10)
    consumer = kafka.consumer(topic, group=unique("g"))
    got = drain(consumer, 5)
    consumer.redeliver([m for m in got if offsets([m])[0] in (3, 2)])
    assert offsets(drain(consumer, 3)) == [2, 3, 4]
    consumer.close()


def test_two_group_members_split_the_partitions(kafka: KafkaBroker) -> None:
    topic, group = unique("req"), unique("g")
    kafka.ensure_topics([topic])
    a, b = kafka.consumer(topic, group=group), kafka.consumer(topic, group=group)

    def split() -> bool:  # members join and rebalance while they poll
        assert a.next_batch(1, timeout_s=0.1) == b.next_batch(1, timeout_s=0.1) == []
        return bool(a.assigned()) and bool(b.assigned()) and not a.assigned() & b.assigned() \
            and a.assigned() | b.assigned() == set(range(kafka.cfg.kafka.partitions))

    poll_until(split, timeout=30, interval=0, message="both members to own partitions")
    kafka.producer().publish([OutMessage(topic, str(i).encode(), key=f"k{i}") for i in range(40)],
                             timeout_s=10)
    seen: dict[str, list[Message]] = {"a": [], "b": []}

    def all_read() -> bool:
        for name, consumer in (("a", a), ("b", b)):
            batch = consumer.next_batch(50, timeout_s=0.1)
            seen[name].extend(batch)
            consumer.commit(batch)
        return len(seen["a"]) + len(seen["b"]) >= 40

    poll_until(all_read, timeout=20, interval=0, message="all 40 messages")
    for name, consumer in (("a", a), ("b", b)):
        assert {int(m.source_id.split("/")[1]) for m in seen[name]} <= consumer.assigned()
    assert sorted(m.value for m in seen["a"] + seen["b"]) == sorted(
        str(i).encode() for i in range(40))
    a.close()
    b.close()


def test_a_commit_after_a_rebalance_is_dropped_and_the_new_owner_delivers_again(
        kafka: KafkaBroker) -> None:
    topic, group = unique("req"), unique("g")
    kafka.ensure_topics([topic])
    kafka.producer().publish([OutMessage(topic, str(i).encode(), key=f"k{i}") for i in range(40)],
                             timeout_s=10)
    a = kafka.consumer(topic, group=group)
    held = drain(a, 40)  # a owns every partition and is "still working" on these
    assert len(held) == 40
    b = kafka.consumer(topic, group=group)
    from_b: list[Message] = []

    def b_took_over() -> bool:
        a.next_batch(50, timeout_s=0.1)  # a rejoins on its next poll
        from_b.extend(b.next_batch(50, timeout_s=0.1))
        return bool(from_b)

    poll_until(b_took_over, timeout=30, interval=0, message="the rebalance")
    a.commit(held)  # partitions now b's are skipped with a warning, no exception
    b_partitions = {m.source_id.split("/")[1] for m in from_b}
    expected = sorted(m.value for m in held if m.source_id.split("/")[1] in b_partitions)
    from_b.extend(drain(b, len(expected) - len(from_b), timeout=10))
    assert sorted(m.value for m in from_b) == expected
    a.close()
    b.close()


def test_private_reader_from_beginning_sees_history_and_redeliver_changes_nothing(
        kafka: KafkaBroker) -> None:
    topic = unique("res")
    kafka.ensure_topics([topic])
    kafka.producer().publish([OutMessage(topic, b"old")], timeout_s=10)
    reader = kafka.consumer(topic, group=None, from_beginning=True)
    got = drain(reader, 1)
    assert [m.value for m in got] == [b"old"]
    reader.redeliver(got)  # a reader takes nothing away; nothing to give back
    reader.commit(got)
    assert reader.next_batch(10, timeout_s=0.5) == []
    reader.close()


def test_consumer_of_a_missing_topic_says_so(kafka: KafkaBroker) -> None:
    with pytest.raises(BrokerError, match="does not exist"):
        kafka.consumer(unique("missing"), group=unique("g"))


def test_publish_to_a_missing_topic_fails_within_its_bounds(cfg: config.Config) -> None:
    quick = dataclasses.replace(cfg, broker=dataclasses.replace(cfg.broker, connect_timeout_s=2))
    broker = KafkaBroker(quick)
    started = time.monotonic()
    with pytest.raises(BrokerError):
        broker.producer().publish([OutMessage(unique("missing"), b"x")], timeout_s=2)
    assert time.monotonic() - started < 10
    broker.close()


def test_a_kafka_extra_property_takes_effect_in_the_clients(cfg: config.Config) -> None:
    # librdkafka's message.max.bytes, lowered through kafka.extra: the producer refuses what
    # the same broker without it takes
    topic = unique("req")
    small = KafkaBroker(config.with_overrides(
        cfg, {"kafka": {"extra": {"message.max.bytes": 2000, "client.rack": "rack-a"}}}, "test"))
    plain = KafkaBroker(cfg)
    try:
        small.ensure_topics([topic])
        plain.producer().publish([OutMessage(topic, b"x" * 5000)], timeout_s=10)
        small.producer().publish([OutMessage(topic, b"y" * 500)], timeout_s=10)
        with pytest.raises(BrokerError) as info:
            small.producer().publish([OutMessage(topic, b"z" * 5000)], timeout_s=10)
        assert "MSG_SIZE_TOO_LARGE" in info.value.message
        assert "message.max.bytes" in info.value.hint
        got = drain(small.consumer(topic, group=unique("g")), 2)
        assert sorted(len(m.value) for m in got) == [500, 5000]
    finally:
        small.close()
        plain.close()
