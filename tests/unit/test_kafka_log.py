"""The model store's keyed log asks again while a topic created a moment ago settles."""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from fmnist.brokers.kafka import log
from fmnist.errors import BrokerError


class Broker:
    address = "127.0.0.1:9092"

    def error(self, what: str, exc: KafkaException) -> BrokerError:
        return BrokerError(f"could not {what}: {exc.args[0].name()}", "")


class Consumer:
    """Answers with ``failures`` first, then the watermarks (3, 7)."""

    def __init__(self, *failures: int) -> None:
        self.failures = list(failures)
        self.calls = 0

    def get_watermark_offsets(self, partition: Any, timeout: float) -> tuple[int, int]:
        self.calls += 1
        if self.failures:
            raise KafkaException(KafkaError(self.failures.pop(0)))
        return 3, 7


def test_a_settling_topic_is_asked_again() -> None:
    consumer = Consumer(KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.UNKNOWN_TOPIC_OR_PART)
    found = log._watermarks(Broker(), consumer, "models", time.monotonic() + 5)  # type: ignore[arg-type]
    assert found == (3, 7) and consumer.calls == 3


def test_other_errors_and_the_deadline_end_the_read() -> None:
    with pytest.raises(BrokerError, match="TOPIC_AUTHORIZATION_FAILED"):
        log._watermarks(Broker(), Consumer(KafkaError.TOPIC_AUTHORIZATION_FAILED),  # type: ignore[arg-type]
                        "models", time.monotonic() + 5)
    forever = Consumer(*[KafkaError.NOT_LEADER_FOR_PARTITION] * 100)
    started = time.monotonic()
    with pytest.raises(BrokerError, match="NOT_LEADER_FOR_PARTITION"):
        log._watermarks(Broker(), forever, "models", started + 0.3)  # type: ignore[arg-type]
    assert 0.3 <= time.monotonic() - started < 1.0 and forever.calls > 1
