"""Integration fixtures: the real Kafka and the real Pub/Sub emulator (`scripts/brokers up`).

A broker that is not running fails the test rather than skipping it: CI starts both, and a
missing broker must turn CI red, not quietly shrink the suite.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from fmnist import config
from fmnist.brokers import Broker, Consumer, Message, connect
from fmnist.brokers.kafka import KafkaBroker
from fmnist.brokers.pubsub import PubsubBroker
from fmnist.testing.processes import WorkerProcess
from fmnist.testing.topics import Topics


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=[pytest.param("kafka", marks=pytest.mark.kafka),
                        pytest.param("pubsub", marks=pytest.mark.pubsub)])
def broker_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def cfg() -> config.Config:
    return config.load()


def _checked(name: str, cfg: config.Config) -> Iterator[Broker]:
    b = connect(name, cfg)
    b.check(timeout_s=10)  # raises BrokerError -> test error, never a skip
    yield b
    b.close()


@pytest.fixture
def broker(broker_name: str, cfg: config.Config) -> Iterator[Broker]:
    """Each broker in turn (the contract tests)."""
    yield from _checked(broker_name, cfg)


@pytest.fixture
def kafka(cfg: config.Config) -> Iterator[KafkaBroker]:
    """The real Kafka, for what only Kafka does."""
    for b in _checked("kafka", cfg):
        assert isinstance(b, KafkaBroker)
        yield b


@pytest.fixture
def pubsub(cfg: config.Config) -> Iterator[PubsubBroker]:
    """The real Pub/Sub emulator, for what only Pub/Sub does."""
    for b in _checked("pubsub", cfg):
        assert isinstance(b, PubsubBroker)
        yield b


def drain(consumer: Consumer, want: int, timeout: float = 20.0) -> list[Message]:
    """Read until ``want`` messages came or ``timeout`` passed."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got.extend(consumer.next_batch(want - len(got), timeout_s=0.5))
    return got


@pytest.fixture
def topics(broker_name: str) -> Topics:
    return Topics(broker_name)


@pytest.fixture
def start_worker(tmp_path):
    started: list[WorkerProcess] = []

    def start(topics: Topics, *args: str, **env: str) -> WorkerProcess:
        worker = WorkerProcess(topics, tmp_path / f"worker-{len(started)}.log", *args, env=env)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()
