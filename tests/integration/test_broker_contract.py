"""One contract, both brokers: what the worker and the clients rely on."""

from __future__ import annotations

import time

import pytest

from fmnist.brokers.base import Broker, OutMessage
from fmnist.errors import BrokerError
from fmnist.testing.waiting import poll_until
from tests.integration.conftest import drain, unique


def test_publish_then_group_consumer_receives_values_headers_and_keys(broker: Broker) -> None:
    topic = unique("contract")
    broker.ensure_topics([topic])
    consumer = broker.consumer(topic, group=unique("g"))
    broker.producer().publish(
        [OutMessage(topic, f"v{i}".encode(), key=f"k{i}", headers={"request_id": f"r{i}"})
         for i in range(5)], timeout_s=10)
    got = drain(consumer, 5)
    assert sorted(m.value for m in got) == [f"v{i}".encode() for i in range(5)]
    assert {m.headers["request_id"] for m in got} == {f"r{i}" for i in range(5)}
    assert all(m.topic == topic and m.source_id for m in got)
    assert len({m.source_id for m in got}) == 5
    consumer.commit(got)
    consumer.close()


def test_uncommitted_messages_are_delivered_again_to_the_group(broker: Broker) -> None:
    topic, group = unique("contract"), unique("g")
    broker.ensure_topics([topic])
    first = broker.consumer(topic, group=group)
    broker.producer().publish([OutMessage(topic, b"a"), OutMessage(topic, b"b")], timeout_s=10)
    got = drain(first, 2)
    assert len(got) == 2
    first.redeliver(got)
    again = drain(first, 2)
    assert sorted(m.value for m in again) == [b"a", b"b"]
    first.commit(again)
    first.close()


def test_committed_messages_are_not_delivered_again(broker: Broker) -> None:
    topic, group = unique("contract"), unique("g")
    broker.ensure_topics([topic])
    consumer = broker.consumer(topic, group=group)
    broker.producer().publish([OutMessage(topic, b"once")], timeout_s=10)
    consumer.commit(drain(consumer, 1))
    consumer.close()
    later = broker.consumer(topic, group=group)
    assert later.next_batch(10, timeout_s=3) == []
    later.close()


def test_private_reader_sees_only_messages_published_after_it_started(broker: Broker) -> None:
    topic = unique("contract")
    broker.ensure_topics([topic])
    producer = broker.producer()
    producer.publish([OutMessage(topic, b"before")], timeout_s=10)
    reader = broker.consumer(topic, group=None)
    producer.publish([OutMessage(topic, b"after")], timeout_s=10)
    got = drain(reader, 1)
    assert [m.value for m in got] == [b"after"]
    assert reader.next_batch(10, timeout_s=1) == []
    reader.close()


def test_next_batch_returns_within_its_timeout_when_idle(broker: Broker) -> None:
    topic = unique("contract")
    broker.ensure_topics([topic])
    consumer = broker.consumer(topic, group=unique("g"))
    consumer.next_batch(1, timeout_s=0.2)  # the first call may join the group
    started = time.monotonic()
    assert consumer.next_batch(10, timeout_s=0.3) == []
    assert time.monotonic() - started < 2.0
    consumer.close()


def test_next_batch_hands_out_what_arrived_without_waiting_for_a_full_batch(
        broker: Broker) -> None:
    """A lone request must not wait out the timeout for the batch to fill (librdkafka's
    consume(n, timeout) would: it returns when it has all n, or at the timeout)."""
    topic = unique("contract")
    broker.ensure_topics([topic])
    consumer = broker.consumer(topic, group=unique("g"))
    producer = broker.producer()
    producer.publish([OutMessage(topic, b"first")], timeout_s=10)
    assert [m.value for m in drain(consumer, 1)] == [b"first"]  # joined and reading
    producer.publish([OutMessage(topic, b"lone")], timeout_s=10)
    started = time.monotonic()
    got = consumer.next_batch(100, timeout_s=10)
    waited = time.monotonic() - started
    assert [m.value for m in got] == [b"lone"]
    assert waited < 3.0, f"next_batch held a lone message for {waited:.1f} s"
    consumer.close()


def test_unreachable_broker_fails_fast_with_the_address(broker_name: str, cfg) -> None:
    import dataclasses

    from fmnist.brokers import connect

    if broker_name == "kafka":
        bad = dataclasses.replace(cfg, kafka=dataclasses.replace(cfg.kafka,
                                                                 bootstrap_servers="127.0.0.1:1"))
    else:
        bad = dataclasses.replace(cfg, pubsub=dataclasses.replace(cfg.pubsub,
                                                                  emulator_host="127.0.0.1:1"))
    started = time.monotonic()
    with pytest.raises(BrokerError) as info:
        connect(broker_name, bad).check(timeout_s=3)
    assert time.monotonic() - started < 15
    assert "127.0.0.1:1" in str(info.value)
    assert "scripts/brokers up" in str(info.value)


def test_a_retained_reader_sees_what_was_published_before_it_opened(broker: Broker) -> None:
    """What `fmnist listen --from-beginning` and `fmnist dlq` rely on, whatever the broker."""
    topic = unique("retained")
    broker.ensure_topics([topic])  # Pub/Sub: with the shared <topic>-sub that holds it
    broker.producer().publish([OutMessage(topic, b"before")], timeout_s=10)
    reader = broker.retained_reader(topic)
    got = drain(reader, 1)
    assert [m.value for m in got] == [b"before"]
    reader.commit(got)
    reader.close()


def test_deleted_topics_are_gone_and_deleting_twice_is_fine(broker: Broker) -> None:
    topic = unique("deleted")
    broker.ensure_topics([topic])
    broker.delete_topics([topic])
    broker.delete_topics([topic])  # missing: no error
    poll_until(lambda: _gone(broker, topic), timeout=15, message=f"{topic} deleted")


def _gone(broker: Broker, topic: str) -> bool:
    try:
        broker.consumer(topic, group=unique("g")).close()
    except BrokerError:
        return True
    return False
