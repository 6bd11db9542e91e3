"""The job protocol, option rules, history folding and progress rate, without a broker."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from fmnist import config
from fmnist.brokers.base import Message
from fmnist.cli import app
from fmnist.jobs import history, runner
from fmnist.jobs.protocol import (
    JOB_SCHEMA,
    Job,
    JobRejected,
    carried_options,
    event,
    event_message,
    job_config,
    job_message,
    parse_event,
    parse_job,
)


def message(value: bytes, headers: dict[str, str] | None = None) -> Message:
    return Message(value=value, headers=headers or {}, key=None, topic="jobs",
                   source_id="jobs/0/7", broker_time_ms=None, received_at=0.0)


def job(options: dict[str, Any], kind: str = "train") -> Job:
    return Job("job-1", kind, options, "test", 0.0)


def test_a_job_message_round_trips() -> None:
    sent = Job("job-20261204-101500-a1b2c3", "train", {"train": {"epochs": 2}}, "ana@x", 1.5)
    out = job_message("jobs", sent)
    assert out.key == sent.job_id and out.headers["schema"] == JOB_SCHEMA
    assert parse_job(message(out.value, out.headers), 65536) == sent


@pytest.mark.parametrize(("value", "code"), [
    (b"not json", "unreadable_job"),
    (b"[1, 2]", "unreadable_job"),
    (json.dumps({"schema": "fmnist.job/2", "job_id": "job-x", "kind": "train"}).encode(),
     "unsupported_schema"),
    (json.dumps({"schema": JOB_SCHEMA, "kind": "train"}).encode(), "unreadable_job"),
    (json.dumps({"schema": JOB_SCHEMA, "job_id": "job-x", "kind": "predict"}).encode(),
     "unsupported_kind"),
    (json.dumps({"schema": JOB_SCHEMA, "job_id": "job-x", "kind": "train",
                 "options": [1]}).encode(), "invalid_options"),
    (b"{" + b" " * 2000 + b"}", "job_too_large"),
])
def test_unreadable_job_messages_are_rejected_with_a_code(value: bytes, code: str) -> None:
    with pytest.raises(JobRejected) as caught:
        parse_job(message(value), max_bytes=1024)
    assert caught.value.code == code and caught.value.message


def test_a_job_id_that_is_not_a_plain_name_is_not_echoed() -> None:
    body = {"schema": "fmnist.job/9", "job_id": "../../x", "kind": "train"}
    with pytest.raises(JobRejected) as caught:
        parse_job(message(json.dumps(body).encode()), 65536)
    assert caught.value.job_id is None


@pytest.mark.parametrize(("options", "names"), [
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"train": {"epochs": "two"}}, "train.epochs"),
    ({"train": {"epochz": 1}}, "train.epochz"),
    ({"data": {"data_dir": "/etc"}}, "data.*"),
    ({"model": {"weights_dir": "/tmp"}}, "model.weights_dir"),
    ({"model": {"name": "../evil"}}, "model.name"),
    ({"train": {"teacher": "/etc/passwd"}}, "train.teacher"),
    ({"serve": {"broker": "kafka"}}, "serve.*"),
])
def test_job_options_follow_the_config_rules_and_name_the_key(options: dict[str, Any],
                                                              names: str) -> None:
    with pytest.raises(JobRejected) as caught:
        job_config(config.load(), job(options))
    assert caught.value.code == "invalid_options"
    assert names in caught.value.message, caught.value.message


def test_an_evaluate_job_may_only_name_its_model() -> None:
    cfg = job_config(config.load(), job({"model": {"name": "quick"}}, kind="evaluate"))
    assert cfg.model.name == "quick"
    with pytest.raises(JobRejected):
        job_config(config.load(), job({"train": {"epochs": 1}}, kind="evaluate"))


def test_valid_options_land_on_the_workers_config_and_the_teacher_is_a_name() -> None:
    base = config.load()
    cfg = job_config(base, job({"train": {"epochs": 3, "teacher": "fmnist-full"},
                                "model": {"name": "quick", "filters": [8, 16]}}))
    assert cfg.train.epochs == 3 and cfg.model.name == "quick" and cfg.model.filters == (8, 16)
    assert cfg.train.teacher == base.model.weights_dir / "fmnist-full.keras"
    assert cfg.model.weights_dir == base.model.weights_dir  # the worker's own paths
    assert job_config(base, job({"train": {"teacher": None}})).train.teacher is None


def test_a_client_carries_only_what_a_job_may_set() -> None:
    settings = config.user_settings(None, {"train.epochs": 2},
                                    env={"FMNIST_MODEL__WEIGHTS_DIR": "/tmp/w",
                                         "FMNIST_TRAIN__LIMIT": "300",
                                         "FMNIST_SERVE__BROKER": "pubsub"})
    assert carried_options("train", settings) == {"train": {"limit": 300, "epochs": 2}}


def test_events_round_trip_and_unknown_schemas_are_skipped() -> None:
    body = event("job-1", "epoch", epoch=0, epochs=2)
    out = event_message("events", body)
    assert out.key == "job-1" and out.headers["event"] == "epoch"
    assert parse_event(message(out.value)) == body
    assert parse_event(message(json.dumps({**body, "schema": "fmnist.job-event/9"}).encode())) \
        is None
    assert parse_event(message(b"\xff")) is None


def test_fold_tells_each_jobs_story() -> None:
    events = [
        event("a", "submitted", kind="train", submitted_by="ana"),
        event("b", "submitted", kind="evaluate", submitted_by="bo"),
        event("a", "started", attempt=1, worker_id="w1"),
        event("a", "epoch", epoch=0, epochs=3),
        event("a", "started", attempt=2, worker_id="w2", resumed_from_epoch=1),
        event("a", "epoch", epoch=1, epochs=3),
        event("b", "cancel_requested", requested_by="bo"),
        event("a", "result", status="succeeded", worker_id="w2"),
    ]
    for i, e in enumerate(events):
        e["time"] = 100.0 + i
    states = history.fold(history.ordered(events + [events[3]]))  # a repeated delivery
    a, b = states["a"], states["b"]
    assert (a.status, a.attempts, a.worker_id, a.epoch, a.epochs) == ("succeeded", 2, "w2", 2, 3)
    assert a.duration_s() == 5.0 and a.ended
    assert (b.status, b.cancel_requested, b.submitted_by) == ("queued", True, "bo")
    assert list(states) == ["a", "b"]


def test_progress_events_are_rate_limited_but_epochs_never(monkeypatch) -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    clock = iter(i * 0.05 for i in range(10_000))  # a batch every 50 ms
    monkeypatch.setattr(runner.time, "monotonic", lambda: next(clock))
    reporter = runner.EventReporter(lambda kind, fields: sent.append((kind, fields)), per_s=4)
    reporter.start("CPU", epochs=2, steps=100, summary="s")
    for epoch in range(2):
        for step in range(1, 101):
            reporter.batch(epoch, step, {"loss": 1.0, "accuracy": float("nan")})
        reporter.epoch(epoch, {"loss": 1.0}, 5.0)
    fits = [f for kind, f in sent if f.get("phase") == "fit"]
    assert 36 <= len(fits) <= 40  # 10 s of batches, at most 4 a second
    assert fits[0]["logs"]["accuracy"] is None  # NaN is not JSON
    assert [f["epoch"] for kind, f in sent if kind == "epoch"] == [0, 1]
    assert sent[-1][1]["phase"] == "testing"


def test_failures_carry_a_code_and_the_exit_code() -> None:
    from fmnist.errors import ConfigError, DataError

    assert runner.failure(DataError("no data"))["code"] == "missing_data"
    assert runner.failure(ConfigError("bad"))["exit_code"] == 2
    crashed = runner.failure(ZeroDivisionError("x"))
    assert crashed["code"] == "job_crashed" and crashed["exit_code"] == 1


def test_resumable_epoch_reads_a_checkpoints_state(tmp_path: Path) -> None:
    assert runner.resumable_epoch(tmp_path) is None
    (tmp_path / "state.json").write_text(json.dumps({"epochs_done": 3}))
    assert runner.resumable_epoch(tmp_path) == 3


JOBS_COMMANDS = ["list", "watch", "cancel"]


@pytest.mark.parametrize("command", JOBS_COMMANDS)
def test_jobs_commands_have_help_and_valid_examples(command: str) -> None:
    result = CliRunner().invoke(app, ["jobs", command, "--help"])
    assert result.exit_code == 0, result.output
    group = typer.main.get_command(app).commands["jobs"]  # type: ignore[attr-defined]
    click_command = group.commands[command]
    _, _, block = (click_command.help or "").partition("Examples:")
    examples = [line.strip() for line in block.splitlines() if line.strip()]
    assert examples
    for example in examples:
        argv = shlex.split(example)
        assert argv[:3] == ["fmnist", "jobs", command]
        with click_command.make_context(command, argv[3:]):
            pass


def test_a_job_worker_refuses_serving_only_options() -> None:
    result = CliRunner().invoke(app, ["serve", "--jobs", "--metrics-port", "9100"])
    assert result.exit_code == 2
    assert "--metrics-port" in result.output
