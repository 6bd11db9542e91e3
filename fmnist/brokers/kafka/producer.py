"""Publishing through the broker's shared, idempotent producer, and waiting for its delivery
reports."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException

from fmnist.brokers.base import OutMessage
from fmnist.brokers.kafka import errors
from fmnist.errors import BrokerTimeout

if TYPE_CHECKING:
    from fmnist.brokers.kafka.broker import KafkaBroker


class KafkaTopicProducer:
    """Publishes through the broker's shared producer."""

    def __init__(self, broker: KafkaBroker) -> None:
        self.broker = broker
        broker.shared_producer()  # connected now, not inside the first send's timing

    def send(self, messages: list[OutMessage], timeout_s: float) -> KafkaConfirmation:
        """Queue all in librdkafka (its threads send them); ``wait`` collects the reports."""
        producer = self.broker.shared_producer()
        deadline = time.monotonic() + timeout_s
        confirmation = KafkaConfirmation(self.broker, producer, messages, timeout_s, deadline)
        report = confirmation.delivered
        produce = producer.produce
        topic = messages[0].topic if messages else "-"
        with self.broker.translated(f"send to {topic}", {"Topic": ("Write", topic)}):
            for m in messages:
                while True:
                    try:  # str key and header values: the client encodes them (UTF-8) in C
                        produce(m.topic, m.value, m.key, headers=m.headers, on_delivery=report)
                        break
                    except BufferError:  # librdkafka's queue is full: let it drain
                        if time.monotonic() >= deadline:
                            raise BrokerTimeout(
                                f"Kafka at {self.broker.address}: the producer's queue stayed "
                                f"full for {timeout_s:g} s.", "Is the broker up and keeping "
                                "up? `scripts/kafka.sh status` checks the local one.") from None
                        producer.poll(0.01)
        return confirmation

    def publish(self, messages: list[OutMessage], timeout_s: float) -> None:
        self.send(messages, timeout_s).wait()

    def close(self) -> None:
        """Nothing to release: the producer belongs to the broker and closes with it."""


class KafkaConfirmation:
    """The delivery reports of one ``send``: ``wait`` serves the producer's reports until all
    of this send's have come (or its deadline passes); a producer that failed to deliver is
    replaced (``discard_producer``)."""

    def __init__(self, broker: KafkaBroker, producer: Any, messages: list[OutMessage],
                 timeout_s: float, deadline: float) -> None:
        self.broker, self.producer, self.messages = broker, producer, messages
        self.timeout_s, self.deadline = timeout_s, deadline
        # list.append is atomic: reports may be served by any thread that polls the producer
        self.reports: list[KafkaError | None] = []
        self.refused_topic = ""  # the topic of the first message refused (a missing ACL)

    def delivered(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None and not self.refused_topic and msg is not None:
            self.refused_topic = msg.topic() or ""
        self.reports.append(err)

    def wait(self) -> None:
        expected = len(self.messages)
        while len(self.reports) < expected:
            left = self.deadline - time.monotonic()
            if left <= 0:
                break
            self.producer.poll(min(left, 1.0))  # returns as soon as a report is served
        failed = [err for err in self.reports if err is not None]
        missing = expected - len(self.reports)
        if not failed and not missing:
            return
        self.broker.discard_producer(self.producer)
        topic = self.messages[0].topic
        what = f"confirm {len(failed) + missing} of {expected} message(s) to {topic}"
        if missing or all(err.code() in errors.TIMEOUTS for err in failed):
            raise BrokerTimeout(f"Kafka at {self.broker.address} did not {what} within "
                                f"{self.timeout_s:g} s.", "Is the broker up, and does the topic "
                                "exist? `scripts/brokers up` starts the local one.")
        refused = self.refused_topic or topic
        raise self.broker.error(what if refused == topic else f"{what} ({refused})",
                                KafkaException(failed[0]), {"Topic": ("Write", refused)})
