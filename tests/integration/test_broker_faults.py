"""Broker outages, on a Kafka of our own (its own ports and state directory), so that it can
be stopped and started without disturbing the shared one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fmnist.testing import scenarios
from fmnist.testing.scenarios import OwnKafka

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture(scope="module")
def own_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnKafka]:
    kafka = OwnKafka(tmp_path_factory.mktemp("own-kafka"))
    yield kafka
    kafka.down()


def test_a_worker_started_before_kafka_waits_with_backoff_then_serves(
        own_kafka: OwnKafka, tmp_path) -> None:
    report = scenarios.kafka_late(own_kafka, tmp_path)
    facts = report.facts
    # It said so: each failed attempt is logged with the pause before the next, and the
    # pauses grow (0.5 s, 1 s, 2 s, ... capped at 10 s).
    assert "is not reachable" in facts["log"]
    waits = facts["waits"]
    assert len(waits) >= 3 and waits[:3] == [0.5, 1.0, 2.0], waits
    assert waits == sorted(waits) and max(waits) <= 10, waits
    # Then it served, without a restart: every request answered, correctly, once.
    assert facts["running"], facts["log"]
    assert (report.sent, report.answered, report.lost) == (200, 200, 0), report
    assert report.duplicates == report.error_responses == report.wrong_labels == 0, report


def test_kafka_stopped_and_restarted_under_load_loses_nothing(own_kafka: OwnKafka,
                                                              tmp_path) -> None:
    report = scenarios.kafka_restart(own_kafka, tmp_path, count=1000)
    facts = report.facts
    # Kafka went away with most of the backlog still to answer.
    assert facts["answered_at_stop"] < 1000, facts
    # The same worker process recovered by itself...
    assert facts["running"], facts["log"]
    # ...and nothing was lost. A publish that failed was never followed by a commit of its
    # requests (a commit without the answer would lose the request, and none was lost); a
    # commit that failed after the answer was published means that batch is answered again:
    # duplicates are allowed, and counted.
    assert (report.sent, report.answered, report.lost) == (1000, 1000, 0), report
    assert report.error_responses == report.wrong_labels == 0, report
