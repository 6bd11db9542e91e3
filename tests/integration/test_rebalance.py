"""Rebalances under load: workers join and leave a Kafka consumer group while requests flow."""

from __future__ import annotations

import pytest

from fmnist.testing import scenarios

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_workers_joining_and_leaving_lose_nothing_and_leave_no_lag(tmp_path) -> None:
    report = scenarios.rebalance(tmp_path)
    facts = report.facts
    # Each newcomer got partitions and answered a share while the first kept answering.
    assert len(facts["by_worker"]) == 3 and min(facts["by_worker"].values()) >= 60, facts
    # One left cleanly (SIGTERM, exit 0), one was killed (SIGKILL).
    assert facts["exit_codes"] == [0, -9], facts
    # Requests were flowing throughout: more were sent after each change.
    assert facts["second_joined_at"] < facts["second_left_at"] < report.sent, facts
    assert facts["third_left_at"] < report.sent, facts
    # Nothing lost; duplicates (a batch whose commit a rebalance refused) allowed and counted.
    assert report.lost == 0 and report.answered == report.sent, report
    assert report.error_responses == report.wrong_labels == 0, report
    # No partition stuck: the group's committed offsets reached the end of every partition.
    assert facts["lag"] == {0: 0, 1: 0, 2: 0, 3: 0}, facts
