"""Graceful shutdown in the middle of a busy stream, and the second signal that skips it."""

from __future__ import annotations

import pytest

from fmnist.testing import scenarios

pytestmark = pytest.mark.slow
COUNT = 1000


def test_sigterm_drains_commits_and_exits_0_and_a_second_signal_exits_130(
        broker_name: str, tmp_path) -> None:
    drained, hard = scenarios.sigterm(broker_name, tmp_path, count=COUNT)

    # SIGTERM mid-stream: exit 0, promptly, after answering the batch in flight.
    facts = drained.facts
    assert facts["exit_code"] == 0, facts["log"]
    assert facts["exit_s"] < 15, facts
    assert "SIGTERM received: finishing the batch in flight" in facts["log"]
    assert "stopped after" in facts["log"]
    assert facts["answered_at_exit"] < COUNT, "the stream was over before the signal"
    # Every request answered (by the drained worker or its successor) and, what draining
    # buys: none answered twice. Everything the first worker answered, it had committed
    # before it exited, so its successor was not handed any of it again.
    assert (drained.sent, drained.answered, drained.lost) == (COUNT, COUNT, 0), drained
    assert drained.duplicates == 0, drained
    assert len(facts["by_worker"]) == 2, facts["by_worker"]
    assert drained.error_responses == drained.wrong_labels == 0, drained

    # A second signal while draining: exit 130 at once. Nothing is lost (what the worker held
    # is delivered again to the next one); a duplicate is allowed here.
    assert hard.facts["exit_code"] == 130, hard.facts["log"]
    assert hard.facts["exit_s"] < 5, hard.facts
    assert (hard.sent, hard.answered, hard.lost) == (COUNT, COUNT, 0), hard
    assert hard.error_responses == hard.wrong_labels == 0, hard
