"""Training and evaluation as jobs, against the real brokers and the real dataset: job workers
in subprocesses (`fmnist serve --jobs`), clients through the CLI, events read back from the
broker."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fmnist import config
from fmnist.brokers import Broker, connect
from fmnist.brokers.base import OutMessage
from fmnist.jobs import history
from fmnist.jobs.protocol import JOB_SCHEMA, Job, job_message, parse_event
from fmnist.testing.processes import FMNIST, ROOT, WorkerProcess
from fmnist.testing.topics import Topics
from fmnist.testing.waiting import poll_until

pytestmark = pytest.mark.slow
TRAIN = ["--epochs", "2", "--limit", "3000"]


class JobsSetup:
    """Private jobs topics for one test, and processes pointed at them."""

    def __init__(self, broker_name: str, tmp: Path) -> None:
        tag = uuid.uuid4().hex[:10]
        self.broker_name, self.tmp = broker_name, tmp
        self.topics = Topics(broker_name)
        self.jobs_topic, self.events, self.dlq = f"jobs-{tag}", f"jobevents-{tag}", f"jobs-{tag}.dlq"
        self.settings = {"FMNIST_JOBS__TOPIC": self.jobs_topic,
                         "FMNIST_JOBS__EVENTS_TOPIC": self.events,
                         "FMNIST_JOBS__DLQ_TOPIC": self.dlq, "FMNIST_SERVE__BROKER": broker_name,
                         "FMNIST_TRAIN__TEACHER": "", "FMNIST_PUBSUB__ACK_DEADLINE_S": "10",
                         "FMNIST_KAFKA__GROUP_ID": f"jobworkers-{tag}",
                         "FMNIST_REGISTRY__TOPIC": f"models-{tag}",
                         "FMNIST_REGISTRY__BLOB_TOPIC": f"models-{tag}.blobs",
                         "FMNIST_REGISTRY__EVENTS_TOPIC": f"modelevents-{tag}",
                         "FMNIST_REGISTRY__DIR": str(tmp / "store")}
        self.client_home = tmp / "client"
        self.workers: list[WorkerProcess] = []
        self.recorder: Recorder

    def env(self, weights: Path, **extra: str) -> dict[str, str]:
        return self.topics.env({**self.settings, "FMNIST_MODEL__WEIGHTS_DIR": str(weights),
                                **extra})

    def worker_home(self, name: str) -> Path:
        """A weights folder of its own, holding the shipped model (for evaluate jobs)."""
        home = self.tmp / name
        if not home.exists():
            home.mkdir(parents=True)
            for suffix in (".keras", ".meta.json"):
                shutil.copy(ROOT / "weights" / f"fmnist{suffix}", home / f"fmnist{suffix}")
        return home

    def start_worker(self, name: str = "w1") -> WorkerProcess:
        worker = WorkerProcess(self.topics, self.tmp / f"{name}-{len(self.workers)}.log", "--jobs",
                               env=self.env(self.worker_home(name),
                                            FMNIST_SERVE__WORKER_ID=name))
        self.workers.append(worker)
        return worker

    def fmnist(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*FMNIST, *args], env=self.env(self.client_home), cwd=self.tmp,
                              capture_output=True, text=True, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """A client the test interrupts (Ctrl+C): SIGINT at its default in the child even when
        the suite itself runs where it is ignored (a shell's background job inherits SIG_IGN,
        and Python would then never raise KeyboardInterrupt)."""
        return subprocess.Popen([*FMNIST, *args], env=self.env(self.client_home), cwd=self.tmp,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def config(self) -> config.Config:
        return config.load(env=self.env(self.client_home))


@pytest.fixture
def jobs(broker_name: str, tmp_path: Path) -> Iterator[JobsSetup]:
    setup = JobsSetup(broker_name, tmp_path)
    yield setup
    for worker in setup.workers:
        worker.kill()
    b = connect(broker_name, setup.config())
    try:
        b.delete_topics([setup.jobs_topic, setup.events, setup.dlq])
    finally:
        b.close()


class Recorder:
    """Every event published on the jobs' events topic from the start of the test, read live
    in a thread: the tests look at what happened without reading the history themselves."""

    def __init__(self, b: Broker, topic: str) -> None:
        self.consumer = b.consumer(topic)
        self.events: list[dict[str, Any]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            for m in self.consumer.next_batch(500, timeout_s=0.2):
                if (e := parse_event(m)) is not None:
                    self.events.append(e)

    def of(self, job_id: str) -> list[dict[str, Any]]:
        return history.ordered([e for e in list(self.events) if e["job_id"] == job_id])

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)
        self.consumer.close()


@pytest.fixture
def events_broker(jobs: JobsSetup) -> Iterator[Broker]:
    b = connect(jobs.broker_name, jobs.config())
    b.ensure_topics([jobs.jobs_topic, jobs.events, jobs.dlq])
    jobs.recorder = Recorder(b, jobs.events)
    yield b
    jobs.recorder.close()
    b.close()


def job_events(b: Broker, jobs: JobsSetup, job_id: str) -> list[dict[str, Any]]:
    return jobs.recorder.of(job_id)


def wait_for_result(b: Broker, jobs: JobsSetup, job_id: str, timeout: float = 240
                    ) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def ended() -> bool:
        found[:] = job_events(b, jobs, job_id)
        return any(e["type"] == "result" for e in found)

    try:
        poll_until(ended, timeout=timeout, interval=0.2, message=f"a result for {job_id}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; events: {[e['type'] for e in found]}; last worker's log: "
                             f"{jobs.workers[-1].output()[-2000:]}") from None
    return found


def test_train_job_streams_progress_returns_its_model_and_can_be_watched_again(
        jobs: JobsSetup, events_broker: Broker) -> None:
    jobs.start_worker()
    run = jobs.fmnist("train", "--broker", jobs.broker_name, *TRAIN, "--name", "remote",
                      "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["status"] == "succeeded" and result["kind"] == "train"
    assert result["model"]["name"] == "remote" and result["worker_id"] == "w1"
    assert result["metrics"]["test_accuracy"] > 0.5, result["metrics"]  # well above chance
    assert (jobs.tmp / "w1" / "remote.keras").is_file()  # left where serving workers load it
    assert Path(result["pictures"]["curve"]).is_file()  # the curve came back to the client
    # the submitting client drew the same progress as a local run
    assert "epoch 2/2: loss" in run.stderr and "Started on job worker w1" in run.stderr

    job_id = result["job_id"]
    # published to the model store, with the job in its lineage; promoting stays a decision
    assert result["published"], (result.get("publish_error"), jobs.workers[-1].output()[-3000:])
    assert result["published"]["ref"] == f"remote@{result['model']['version']}", result
    shown = jobs.fmnist("models", "show", result["published"]["ref"], "--broker",
                        jobs.broker_name, "--json")
    assert shown.returncode == 0, shown.stderr
    [version] = json.loads(shown.stdout)["versions"]
    assert version["lineage"]["trained_by_job"] == job_id and version["lineage"]["dataset"]
    assert version["metrics"]["test_accuracy"] == result["metrics"]["test_accuracy"]
    assert json.loads(shown.stdout)["serving"] is None

    events = job_events(events_broker, jobs, job_id)
    types = [e["type"] for e in events]
    assert types[0] == "submitted" and types[-1] == "result" and types.count("result") == 1
    assert [e["epoch"] for e in events if e["type"] == "epoch"] == [0, 1]
    fits = [e["time"] for e in events if e.get("phase") == "fit"]
    assert fits, types
    assert all(b - a >= 0.24 for a, b in zip(fits, fits[1:], strict=False))  # <= 4 events/s

    watched = jobs.fmnist("jobs", "watch", job_id, "--broker", jobs.broker_name, "--json")
    assert watched.returncode == 0, watched.stderr
    lines = [json.loads(line) for line in watched.stdout.splitlines()]
    assert [e["type"] for e in lines] == types  # the whole history, in order

    listed = jobs.fmnist("jobs", "list", "--broker", jobs.broker_name, "--json")
    assert listed.returncode == 0, listed.stderr
    [state] = [s for s in json.loads(listed.stdout) if s["job_id"] == job_id]
    assert state["status"] == "succeeded" and state["attempts"] == 1
    assert state["worker_id"] == "w1" and state["duration_s"] > 0
    assert state["submitted_by"] and state["epoch"] == 2 and state["epochs"] == 2

    evaluated = jobs.fmnist("evaluate", "--broker", jobs.broker_name, "--name", "remote",
                            "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(evaluated.stdout)
    assert report["metrics"]["accuracy"] == pytest.approx(result["metrics"]["test_accuracy"],
                                                          abs=0.01)
    assert len(report["per_class"]) == 10 and len(report["confusion"]) == 10
    for picture in ("confusion", "errors"):
        assert Path(report["pictures"][picture]).read_bytes()[:4] == b"\x89PNG"


def test_detach_reattach_and_cancel(jobs: JobsSetup, events_broker: Broker) -> None:
    jobs.start_worker()
    submitted = jobs.fmnist("train", "--broker", jobs.broker_name, "--epochs", "40",
                            "--limit", "3000", "--detach", "--json")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]

    watcher = jobs.popen("jobs", "watch", job_id, "--broker", jobs.broker_name)
    poll_until(lambda: any(e["type"] == "epoch" for e in job_events(events_broker, jobs, job_id)),
               timeout=120, interval=0.2, message="the job never finished an epoch")
    watcher.send_signal(signal.SIGINT)  # Ctrl+C: detach, the job goes on
    out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 130, err
    assert f"fmnist jobs watch {job_id} --broker {jobs.broker_name}" in err
    assert "Traceback" not in err

    cancelled = jobs.fmnist("jobs", "cancel", job_id, "--broker", jobs.broker_name)
    assert cancelled.returncode == 0, cancelled.stderr
    events = wait_for_result(events_broker, jobs, job_id, timeout=60)
    assert events[-1]["type"] == "result" and events[-1]["status"] == "cancelled"
    epochs_done = [e["epoch"] for e in events if e["type"] == "epoch"]
    assert len(epochs_done) < 40  # stopped at a batch, not run to its end

    watched = jobs.fmnist("jobs", "watch", job_id, "--broker", jobs.broker_name)
    assert watched.returncode == 130 and "cancelled" in watched.stderr
    assert jobs.workers[0].alive()  # and it takes the next job: see the test below


def test_invalid_and_unreadable_jobs_fail_once_with_a_clear_reason(
        jobs: JobsSetup, events_broker: Broker) -> None:
    worker = jobs.start_worker()
    cfg = jobs.config()
    bad = {"job-bad-range": {"train": {"epochs": 0}},
           "job-bad-path": {"data": {"data_dir": "/etc"}},
           "job-bad-key": {"train": {"epochz": 3}},
           "job-bad-name": {"model": {"name": "../../etc/passwd"}}}
    producer = events_broker.producer()
    events_broker.ensure_topics([jobs.jobs_topic, jobs.events, jobs.dlq])
    ids = {}
    for name, options in bad.items():
        job = Job(f"{name}-{uuid.uuid4().hex[:6]}", "train", options, "test", time.time())
        ids[name] = job.job_id
        producer.publish([job_message(cfg.jobs.topic, job)], timeout_s=10)
    # Unreadable: the wrong schema version, and a message over the size limit.
    producer.publish([
        OutMessage(cfg.jobs.topic, json.dumps({"schema": "fmnist.job/99", "job_id": "job-v99",
                                               "kind": "train"}).encode()),
        OutMessage(cfg.jobs.topic, b"{" + b" " * 70_000 + b"}", headers={"job_id": "job-big"})],
        timeout_s=10)
    producer.close()

    for name, job_id in ids.items():
        events = wait_for_result(events_broker, jobs, job_id, timeout=90)
        [result] = [e for e in events if e["type"] == "result"]
        assert result["status"] == "failed" and result["error"]["code"] == "invalid_options"
        key = {"job-bad-range": "train.epochs", "job-bad-path": "data.",
               "job-bad-key": "train.epochz", "job-bad-name": "model.name"}[name]
        assert key in result["error"]["message"], result["error"]
    for job_id, code in (("job-v99", "unsupported_schema"), ("job-big", "job_too_large")):
        events = wait_for_result(events_broker, jobs, job_id, timeout=60)
        assert [e["error"]["code"] for e in events if e["type"] == "result"] == [code]

    reader = events_broker.retained_reader(jobs.dlq)
    try:
        codes: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while len(codes) < 2 and time.monotonic() < deadline:
            for m in reader.next_batch(10, timeout_s=0.5):
                codes[m.headers["dlq_request_id"]] = m.headers["dlq_error_code"]
    finally:
        reader.close()
    assert codes == {"job-v99": "unsupported_schema", "job-big": "job_too_large"}
    time.sleep(3)  # a retry loop would show a second result by now
    for job_id in [*ids.values(), "job-v99", "job-big"]:
        assert [e["type"] for e in job_events(events_broker, jobs, job_id)].count("result") == 1
    assert worker.alive()


def test_documented_job_example_runs(jobs: JobsSetup, events_broker: Broker) -> None:
    """The job message in docs/jobs.md, sent as it stands (with a fresh id)."""
    text = (ROOT / "docs" / "jobs.md").read_text()
    example = json.loads(re.search(r"<!-- job-example -->\s*```json\n(.*?)```", text,
                                   re.S).group(1))  # type: ignore[union-attr]
    assert example["schema"] == JOB_SCHEMA
    example["job_id"] = f"job-docs-{uuid.uuid4().hex[:6]}"
    jobs.start_worker()
    events_broker.ensure_topics([jobs.jobs_topic, jobs.events, jobs.dlq])
    producer = events_broker.producer()
    producer.publish([OutMessage(jobs.jobs_topic, json.dumps(example).encode(),
                                 key=example["job_id"])], timeout_s=10)
    producer.close()
    events = wait_for_result(events_broker, jobs, example["job_id"])
    assert events[-1]["status"] == "succeeded", events[-1]
    assert events[-1]["model"]["name"] == example["options"]["model"]["name"]


def test_killed_job_worker_resumes_from_its_last_epoch(jobs: JobsSetup,
                                                       events_broker: Broker) -> None:
    first = jobs.start_worker("home")
    submitted = jobs.fmnist("train", "--broker", jobs.broker_name, "--epochs", "4", "--limit",
                            "3000", "--name", "resumed", "--detach", "--json")
    job_id = json.loads(submitted.stdout)["job_id"]
    watcher = jobs.popen("jobs", "watch", job_id, "--broker", jobs.broker_name)
    state = jobs.tmp / "home" / "jobs" / job_id / "state.json"
    poll_until(lambda: state.is_file() and json.loads(state.read_text())["epochs_done"] >= 1,
               timeout=180, interval=0.2, message="no checkpoint after the first epoch")
    first.proc.kill()  # SIGKILL mid-training
    first.proc.wait(timeout=30)
    done = json.loads(state.read_text())["epochs_done"]
    assert done < 4

    jobs.start_worker("home")  # the same home: its checkpoint is there
    events = wait_for_result(events_broker, jobs, job_id, timeout=300)
    out, err = watcher.communicate(timeout=60)
    starts = [e for e in events if e["type"] == "started"]
    assert [s["attempt"] for s in starts] == [1, 2]
    assert starts[1]["resumed_from_epoch"] == done  # not from zero
    second = [e["epoch"] for e in events if e["type"] == "epoch" and e.get("attempt") == 2]
    assert second and second[0] == done, second
    assert events[-1]["status"] == "succeeded"
    assert events[-1]["metrics"]["epochs"] == 4
    assert len(events[-1]["history"]["loss"]) == 4  # the curve spans both attempts
    assert watcher.returncode == 0, err
    assert "Job interrupted" in err and f"resuming after epoch {done}" in err
    assert not (jobs.tmp / "home" / "jobs" / job_id).exists()  # checkpoint cleaned up


def test_two_job_workers_run_each_job_once(jobs: JobsSetup, events_broker: Broker) -> None:
    jobs.start_worker("a")
    jobs.start_worker("b")
    ids = []
    for name in ("one", "two"):
        run = jobs.fmnist("train", "--broker", jobs.broker_name, "--epochs", "1", "--limit",
                          "600", "--name", name, "--detach", "--json")
        assert run.returncode == 0, run.stderr
        ids.append(json.loads(run.stdout)["job_id"])
    for job_id in ids:
        events = wait_for_result(events_broker, jobs, job_id)
        seen = [(e["type"], e.get("worker_id"), round(e["time"] % 1000, 2)) for e in events]
        assert [e["type"] for e in events].count("started") == 1, (
            seen, [w.output()[-1500:] for w in jobs.workers])
        assert [e["type"] for e in events].count("result") == 1
        assert events[-1]["status"] == "succeeded"
    assert all(w.alive() for w in jobs.workers)
