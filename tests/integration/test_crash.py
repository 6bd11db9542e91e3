"""Crash safety: `kill -9` a worker in the middle of a stream of 1,000 requests, start another;
every request is answered at least once, and the listener shows each exactly once."""

from __future__ import annotations

import pytest

from fmnist.testing import scenarios

pytestmark = pytest.mark.slow
COUNT = 1000


def test_kill_9_mid_stream_loses_nothing(broker_name: str, tmp_path) -> None:
    report = scenarios.crash(broker_name, tmp_path, count=COUNT)
    facts = report.facts

    # The kill came mid-stream: some answered, most not yet.
    assert 0 < facts["answered_at_kill"] < COUNT, facts
    # Nothing lost: every request has at least one answer (and every answer is right).
    assert (report.sent, report.answered, report.lost) == (COUNT, COUNT, 0), report
    assert report.error_responses == 0 and report.wrong_labels == 0, report
    # Duplicates are allowed (the killed worker's last batches may have been answered but not
    # committed); each is an answer to a request that was sent, so at most the 20% answered
    # before the kill plus what was in flight. They are reported, not hidden.
    assert report.duplicates < COUNT, report
    # Both workers answered: the second took over where the first stopped.
    assert len(facts["by_worker"]) == 2, facts["by_worker"]
    # `fmnist listen` collapsed the duplicates: each id exactly once, all of them.
    assert facts["listener_rc"] == 0, facts["listener_err"]
    assert len(facts["listener_ids"]) == COUNT
    assert len(set(facts["listener_ids"])) == COUNT
