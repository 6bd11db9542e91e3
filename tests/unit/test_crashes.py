"""The crash-loop guard's parts: the in-flight journal a dead process leaves behind, what the
reports make of each request, and the handler that isolates suspects and refuses the convicted.
Real processes die (SIGKILL) where the journal's locking is what is tested."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fmnist import config
from fmnist.brokers.base import Message, OutMessage
from fmnist.errors import ConfigError
from fmnist.serving import crashes
from fmnist.serving.crashes import CrashGuard, CrashReport, CrashReporter, Journal, Suspects
from fmnist.serving.handler import PredictionHandler
from fmnist.serving.worker import Worker
from fmnist.testing.waiting import poll_until
from tests.fakes import BrightnessPredictor, MemoryBroker
from tests.unit.test_worker import DLQ, REQ, RES, answers, png, request, serve_all

CFG = config.load(env={}, flags={"serve.max_wait_ms": 0, "serve.max_batch_size": 8,
                                 "serve.commit_every_ms": 0})


def die_holding(folder: Path, journals: list[tuple[str, str, list[list[str]]]],
                history: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] | None = None
                ) -> None:
    """A process that opens a journal per (topic, group, batches held) and is SIGKILLed;
    ``history``: what it knew of the first batch of the first journal."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from fmnist.serving.crashes import Journal
        kept, history = [], {history or {}!r}
        for topic, group, batches in {journals!r}:
            j = Journal(Path({str(folder)!r}), topic, group, "doomed")
            for batch in batches:
                j.add(batch, history)
                history = None
            kept.append(j)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == -9, done.stderr


def report(rid: str, *batches: list[str]) -> CrashReport:
    return CrashReport(rid, "w0", 1, time.time(), tuple(tuple(b) for b in batches))


# -- the journal -------------------------------------------------------------------------------

def test_a_dead_process_journal_is_claimed_once_with_what_it_held(tmp_path: Path) -> None:
    die_holding(tmp_path, [("req", "g", [["req/0/1", "req/0/2"], ["req/1/7"]])])
    me = Journal(tmp_path, "req", "g", "w1")
    claimed = me.claim_dead()
    assert [(r.worker_id, r.in_flight) for r in claimed] == [
        ("doomed", (("req/0/1", "req/0/2"), ("req/1/7",)))]
    assert claimed[0].alone is None and claimed[0].requests == ["req/0/1", "req/0/2", "req/1/7"]
    assert abs(claimed[0].died_at - time.time()) < 60
    assert me.claim_dead() == [] and Journal(tmp_path, "req", "g", "w2").claim_dead() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [me.path.name, *(p.name for p in tmp_path.glob("inflight-*") if p != me.path)])


def test_a_live_journal_is_never_claimed_and_a_clean_exit_leaves_nothing(tmp_path: Path) -> None:
    live = Journal(tmp_path, "req", "g", "w1")
    live.add(["req/0/1"])
    assert Journal(tmp_path, "req", "g", "w2").claim_dead() == []
    assert live.path.exists() and json.loads(live.path.read_text())["in_flight"] == [["req/0/1"]]
    live.remove(0)
    assert json.loads(live.path.read_text())["in_flight"] == []
    live.close()
    assert not live.path.exists()


def test_other_topics_dead_journals_are_left_and_empty_or_stale_ones_deleted(
        tmp_path: Path) -> None:
    die_holding(tmp_path, [("req", "g", [["req/0/1"]]), ("other", "g", [["other/0/1"]]),
                           ("req", "g2", [["req/0/1"]]), ("stale", "g", [["stale/0/1"]]),
                           ("third", "g", [])])
    stale = next(p for p in tmp_path.glob("inflight-*")
                 if json.loads(p.read_text())["topic"] == "stale")
    two_days_ago = time.time() - 2 * 86_400
    os.utime(stale, (two_days_ago, two_days_ago))
    me = Journal(tmp_path, "req", "g", "w1")
    assert [r.in_flight for r in me.claim_dead()] == [(("req/0/1",),)]
    left = sorted(json.loads(p.read_text())["topic"] + "/" + json.loads(p.read_text())["group"]
                  for p in tmp_path.glob("inflight-*") if p != me.path)
    assert left == ["other/g", "req/g2"]  # their own workers report them
    assert [r.requests for r in Journal(tmp_path, "other", "g", "w").claim_dead()] == [
        ["other/0/1"]]


def test_a_folder_it_cannot_write_is_a_config_error_that_says_what_to_set(
        tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as caught:
        Journal(blocker / "inflight", "req", "g", "w1")
    assert "serve.journal_dir" in caught.value.message
    assert "FMNIST_SERVE__JOURNAL_DIR" in caught.value.hint


def test_reports_round_trip_and_garbage_is_refused() -> None:
    one = report("inflight-1.json", ["a/0/1"], ["a/0/2"])
    assert CrashReport.from_json(one.to_json()) == one
    for raw in (b"", b"{}", b"[1]", b'{"id": 1, "worker_id": "w", "pid": "x", "died_at": 1, '
                                    b'"in_flight": []}'):
        with pytest.raises(ValueError, match="not a crash report"):
            CrashReport.from_json(raw)


# -- what the reports make of a request --------------------------------------------------------

def test_a_request_is_refused_after_max_crashes_deaths_one_of_them_alone() -> None:
    suspects = Suspects(max_crashes=2)
    assert not suspects
    assert suspects.learn(report("r1", ["a/0/1", "a/0/2"], ["a/0/3"]))
    assert not suspects.learn(report("r1", ["a/0/1"]))  # the same report, read back
    assert suspects and suspects.deaths("a/0/1") == (1, 0) and not suspects.refused("a/0/1")
    suspects.learn(report("r2", ["a/0/1", "a/0/2"]))
    assert suspects.deaths("a/0/1") == (2, 0) and not suspects.refused("a/0/1")  # never alone
    suspects.learn(report("r3", ["a/0/3"]))
    assert suspects.deaths("a/0/3") == (2, 1) and suspects.refused("a/0/3")
    patient = Suspects(max_crashes=3)
    patient.learn(report("r1", ["a/0/3"]))
    patient.learn(report("r2", ["a/0/3"]))
    assert not patient.refused("a/0/3")
    patient.learn(report("r3", ["a/0/3"]))
    assert patient.refused("a/0/3")


def test_a_claimed_report_carries_the_deaths_its_process_knew_of(tmp_path: Path) -> None:
    """Pub/Sub keeps no history for a new reader: a restarted worker learns the earlier death
    from its predecessor's journal, which held the suspect with what was known of it."""
    first = report("inflight-first.json", ["req/0/4", "req/0/5"])
    die_holding(tmp_path, [("req", "g", [["req/0/5"]])],
                history={"req/0/5": (("inflight-first.json",), ())})
    (claimed,) = Journal(tmp_path, "req", "g", "w1").claim_dead()
    assert claimed.history == {"req/0/5": (("inflight-first.json",), ())}
    assert CrashReport.from_json(claimed.to_json()) == claimed
    suspects = Suspects(max_crashes=2)
    suspects.learn(claimed)
    assert suspects.deaths("req/0/5") == (2, 1) and suspects.refused("req/0/5")
    suspects.learn(first)  # the same death, read from the topic later: not counted again
    assert suspects.deaths("req/0/5") == (2, 1) and suspects.deaths("req/0/4") == (1, 0)


def test_suspects_forget_the_oldest_beyond_their_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crashes, "KEEP_SUSPECTS", 3)
    suspects = Suspects(2)
    for i in range(5):
        suspects.learn(report(f"r{i}", [f"a/0/{i}"]))
    assert [suspects.deaths(f"a/0/{i}")[0] for i in range(5)] == [0, 0, 1, 1, 1]


# -- the guard around the handler -------------------------------------------------------------

class Spy(PredictionHandler):
    """Records which requests each ``prepare`` got and what the journal held meanwhile."""

    def __init__(self, journal: Journal) -> None:
        super().__init__(CFG, BrightnessPredictor(), "w1")
        self.journal = journal
        self.calls: list[tuple[list[str], list[list[str]]]] = []

    def prepare(self, messages: list[Message]):  # type: ignore[no-untyped-def]
        self.calls.append(([m.source_id for m in messages], self.journal.holding()))
        return super().prepare(messages)


def messages(*offsets: int) -> list[Message]:
    return [Message(png(25 * (i % 10) + 5), {"request_id": f"id-{i}"}, None, REQ,
                    f"{REQ}/0/{i}", None, time.time()) for i in offsets]


def guard(tmp_path: Path, *reports: CrashReport) -> tuple[CrashGuard, Spy, Journal]:
    journal = Journal(tmp_path, REQ, "g", "w1")
    suspects = Suspects(2)
    for r in reports:
        suspects.learn(r)
    spy = Spy(journal)
    return CrashGuard(spy, journal, suspects), spy, journal


def test_the_journal_holds_a_batch_from_prepare_until_its_answers_are_built(
        tmp_path: Path) -> None:
    handler, _, journal = guard(tmp_path)
    first = handler.prepare(messages(0, 1))
    second = handler.prepare(messages(2))
    assert journal.holding() == [[f"{REQ}/0/0", f"{REQ}/0/1"], [f"{REQ}/0/2"]]
    assert first.finish().outcomes == ["ok", "ok"]
    assert journal.holding() == [[f"{REQ}/0/2"]]
    assert first.finish() is first.finish()  # built once
    second.finish()
    assert journal.holding() == []


def test_suspects_are_handled_alone_after_the_batch_before_them_is_finished(
        tmp_path: Path) -> None:
    handler, spy, journal = guard(tmp_path, report("r1", [f"{REQ}/0/2", f"{REQ}/0/3"]))
    earlier = handler.prepare(messages(0))
    prepared = handler.prepare(messages(1, 2, 3, 4))
    # the suspects 2 and 3 each alone, nothing else in the journal (the batch before them
    # finished first); then 1 and 4 together
    ids = {i: f"{REQ}/0/{i}" for i in range(5)}
    assert spy.calls == [([ids[0]], [[ids[0]]]), ([ids[2]], [[ids[2]]]), ([ids[3]], [[ids[3]]]),
                         ([ids[1], ids[4]], [[ids[1], ids[4]]])]
    assert [m.source_id for m in prepared.messages] == [f"{REQ}/0/{i}" for i in (2, 3, 1, 4)]
    result = prepared.finish()
    assert result.outcomes == ["ok"] * 4
    labels = [json.loads(m.value)["label"] for m in result.out]
    assert labels == [2, 3, 1, 4]  # each answer is its own request's, in the messages' order
    assert earlier.finish().outcomes == ["ok"] and journal.holding() == []


def test_a_convicted_request_is_answered_crashed_worker_and_dead_lettered_undecoded(
        tmp_path: Path) -> None:
    convicted = f"{REQ}/0/5"
    handler, spy, _ = guard(tmp_path, report("r1", [f"{REQ}/0/4", convicted]),
                            report("r2", [convicted]))
    result = handler.prepare(messages(4, 5, 6)).finish()
    assert all(convicted not in ids for ids, _ in spy.calls)
    assert result.outcomes == ["ok", "crashed_worker", "ok"]
    answer, letter = (m for m in result.out if m.headers.get("error_code") == "crashed_worker"
                      or m.topic == DLQ)
    assert json.loads(answer.value)["error"]["code"] == "crashed_worker"
    assert "died 2 times" in json.loads(answer.value)["error"]["message"]
    assert letter.topic == DLQ and letter.headers["dlq_error_code"] == "crashed_worker"
    assert letter.headers["dlq_source"] == convicted


def test_a_worker_with_the_guard_answers_everything_and_refuses_only_the_convicted(
        tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.ensure_topics([REQ, RES, DLQ])
    handler, _, journal = guard(tmp_path, report("r1", [f"{REQ}/0/3"]),
                                report("r2", [f"{REQ}/0/3"]), report("r3", [f"{REQ}/0/1"]))
    worker = Worker(CFG, broker, handler, group="g")
    consumer, producer = broker.consumer(REQ, group="g"), broker.producer()
    producer.publish([request(png(25 * k + 5), f"id-{k}") for k in range(6)], 1)
    serve_all(worker, consumer, producer)
    got = {a["request_id"]: a for a in answers(broker)}
    assert sorted(got) == [f"id-{k}" for k in range(6)]
    assert got["id-3"]["error"]["code"] == "crashed_worker"
    assert all(got[f"id-{k}"]["label"] == k for k in (0, 1, 2, 4, 5))
    assert [m.headers["dlq_request_id"] for m in broker.topics[DLQ]] == ["id-3"]
    assert broker.committed[(REQ, "g")] == 6 and journal.holding() == []


# -- reports over the broker -------------------------------------------------------------------

def test_the_reporter_publishes_claims_and_learns_every_worker_reports() -> None:
    cfg = config.load(env={}, flags={"broker.crash_topic": "crashes"})
    broker = MemoryBroker()
    suspects = Suspects(2)
    mine = report("inflight-mine.json", ["req/0/1"])
    reporter = CrashReporter(cfg, broker, suspects, [mine]).start()
    try:
        poll_until(lambda: len(broker.topics.get("crashes", [])) == 1, 10, message="the report")
        assert CrashReport.from_json(broker.topics["crashes"][0].value) == mine
        broker.producer().publish([OutMessage("crashes", b"not json"), OutMessage(
            "crashes", report("inflight-other.json", ["req/0/9"]).to_json())], 1)
        poll_until(lambda: suspects.deaths("req/0/9") == (1, 1), 10, message="learned")
    finally:
        reporter.stop()
    assert suspects.deaths("req/0/1") == (1, 1)  # its own, read back: counted once
