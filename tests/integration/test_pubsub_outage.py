"""A Pub/Sub outage: an emulator of the test's own (its own port and state directory, so the
shared one on 8085 and the rest of the suite are untouched) is stopped and started again while a
worker serves a steady stream of requests.

The emulator keeps everything in memory, so its restart forgets the topics, the subscriptions
and every message not yet read: requests published before the stop and not yet answered, and
answers not yet read, are gone with it. That is the emulator, not fmnist. What fmnist must do:
recover by itself (the same process makes the topics and subscriptions again and serves), answer
every request published once it says ready, never acknowledge a request whose answer was not
confirmed, fail or retry a client's publish visibly during the outage, and keep /healthz 200
while /readyz says 503 and then 200 again.

The figures are printed; run with ``-s`` to see them:
``.venv/bin/python -m pytest -s tests/integration/test_pubsub_outage.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from fmnist.testing import scenarios
from fmnist.testing.scenarios import OwnPubsub

pytestmark = [pytest.mark.pubsub, pytest.mark.slow]


@pytest.fixture
def own_pubsub(tmp_path: Path) -> Iterator[OwnPubsub]:
    emulator = OwnPubsub(tmp_path / "own-pubsub")
    emulator.up()
    yield emulator
    emulator.down()


def test_emulator_stopped_and_restarted_under_load(own_pubsub: OwnPubsub,
                                                   tmp_path: Path) -> None:
    report = scenarios.pubsub_restart(own_pubsub, tmp_path / "run")
    facts = report.facts
    print(f"\n{report.note}\n" + ", ".join(
        f"{k}={facts[k]}" for k in ("outage_s", "down_s", "up_s", "unready_after_stop_s",
                                    "first_answer_s", "worker_answer_s", "ready_s", "sent_before",
                                    "answered_before", "forgotten", "publishes_retried",
                                    "sent_between", "dropped_between"))
          + f", after ready: sent={report.sent} answered={report.answered} lost={report.lost}")
    # The same worker process recovered by itself: it made the request topic and its
    # subscription again (the test made them before the worker started, so this is the
    # recovery) and answered before and after.
    assert facts["running"], facts["log"]
    assert len(facts["by_worker"]) == 1, facts["by_worker"]
    assert re.search(r"created Pub/Sub subscription req-\S+-sub", facts["log"]), facts["log"]
    # Every request published once /readyz said 200 again is answered, correctly.
    assert report.sent >= 100 and report.lost == 0, report
    assert report.error_responses == report.wrong_labels == 0, report
    # Every answer the worker had confirmed (so every request it had acknowledged) 2 s before
    # the stop reached the client.
    assert facts["received_before"] >= facts["confirmed_before"], facts
    # While the emulator was away, no publish was confirmed: the stream's failed and were
    # retried, and `fmnist send` exited 4 naming the emulator.
    assert facts["sent_during"] == 0 and facts["publishes_retried"] >= 1, facts
    assert facts["send_rc"] == 4 and "not reachable" in facts["send_err"], facts["send_err"]
    # /healthz 200 throughout (the loop is alive, retrying); /readyz 503 with a reason during
    # the outage, 200 again after it.
    assert facts["healthz"] == [200], facts["healthz"]
    assert facts["unready_after_stop_s"] is not None, facts
    assert facts["readyz_texts"] and all(t.startswith("not ready: ")
                                         for t in facts["readyz_texts"]), facts["readyz_texts"]
    assert facts["first_answer_s"] is not None, facts
