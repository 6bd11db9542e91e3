"""No crash loops: a request that kills every worker process which handles it (SIGKILL while it
is in flight, as a native crash would) is dead-lettered as crashed_worker after a bounded
number of deaths, and never handled again; the requests sent with it are answered normally.
Two workers, each with its own journal folder, restarted in place when they die."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmnist.testing import crashing

pytestmark = pytest.mark.slow


def test_a_request_that_kills_workers_is_dead_lettered_after_max_crashes(
        broker_name: str, tmp_path: Path) -> None:
    report = crashing.crash_loop(broker_name, tmp_path, around=40, max_crashes=2)
    facts = report.facts
    # 2 deaths: its batch's, then its own alone; one more is allowed per other worker, which
    # may take it before the reports reach it
    assert 2 <= facts["deaths"] <= 3, (facts, report)
    assert facts["deaths_after"] == 0, facts  # refused, not handled again
    assert facts["answer_codes"] and set(facts["answer_codes"]) == {"crashed_worker"}, facts
    assert facts["letter_codes"] and set(facts["letter_codes"]) == {"crashed_worker"}, facts
    # every other request (40 before it, 40 after, the warm-up and later ones) answered right
    assert report.lost == 0 and report.sent == 1 + 80 + 20 + 20, report
    assert report.error_responses == 1 and report.dlq_records == 1, report
    assert facts["good_errors"] == 0 and report.wrong_labels == 0, report
    assert facts["reported"] == facts["deaths"], facts  # each death reported by its successor
