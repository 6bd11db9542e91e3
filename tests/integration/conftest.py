"""Integration fixtures: the real Kafka and the real Pub/Sub emulator (`scripts/brokers up`).

A broker that is not running fails the test rather than skipping it: CI starts both, and a
missing broker must turn CI red, not quietly shrink the suite.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from fmnist import config
from fmnist.brokers import Broker, connect


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=[pytest.param("kafka", marks=pytest.mark.kafka),
                        pytest.param("pubsub", marks=pytest.mark.pubsub)])
def broker_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def cfg() -> config.Config:
    return config.load()


@pytest.fixture
def broker(broker_name: str, cfg: config.Config) -> Iterator[Broker]:
    b = connect(broker_name, cfg)
    b.check(timeout_s=10)  # raises BrokerError -> test error, never a skip
    yield b
    b.close()


ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
FMNIST = [__import__("sys").executable, "-m", "fmnist"]


class Topics:
    """A private set of topics (and subscriptions / group) for one test, passed by env."""

    def __init__(self, broker_name: str) -> None:
        self.broker_name = broker_name
        tag = uuid.uuid4().hex[:10]
        self.request, self.response, self.dlq = f"req-{tag}", f"res-{tag}", f"req-{tag}.dlq"
        self.group = f"workers-{tag}"

    def env(self, **extra: str) -> dict[str, str]:
        import os

        env = {k: v for k, v in os.environ.items() if not k.startswith("FMNIST_")}
        env.update({config.env_name(k): v for k, v in self.routing().items()})
        env.update(PYTHONUNBUFFERED="1", **extra)
        return env

    def routing(self) -> dict[str, str]:
        return config.routing(self.broker_name, self.request, self.response, self.dlq, self.group)

    def config(self, **sections: dict) -> config.Config:
        flags: dict[str, object] = dict(self.routing())
        for section, values in sections.items():
            flags.update({f"{section}.{k}": v for k, v in values.items()})
        return config.load(flags=flags, env={})


@pytest.fixture
def topics(broker_name: str) -> Topics:
    return Topics(broker_name)


class WorkerProcess:
    """`fmnist serve` in a subprocess, its log in a file the test can read."""

    def __init__(self, topics: Topics, log_path, *args: str, **env: str) -> None:
        import subprocess

        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*FMNIST, "serve", "--quiet", *args], cwd=ROOT,
                                     env=topics.env(**env), stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 30) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        self.log.close()
        return rc


@pytest.fixture
def start_worker(tmp_path):
    started: list[WorkerProcess] = []

    def start(topics: Topics, *args: str, **env: str) -> WorkerProcess:
        worker = WorkerProcess(topics, tmp_path / f"worker-{len(started)}.log", *args, **env)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()
        worker.log.close()
