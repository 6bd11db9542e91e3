"""/readyz against the worker's logic with doubles: what a consumer knows of its broker, a loop
held in a wait on the broker, a model not loaded; and the Kafka consumer's reading of
librdkafka's reports. The real brokers stopping and starting: tests/integration/test_readiness.py."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import pytest
from confluent_kafka import KafkaError

from fmnist.brokers.base import OutageReporting
from fmnist.brokers.kafka.consumer import KafkaTopicConsumer
from fmnist.serving import metrics as metrics_module
from fmnist.serving.metrics import HealthServer, InstrumentedConsumer, Metrics
from fmnist.testing.waiting import http_get as get
from fmnist.testing.waiting import poll_until
from tests.unit.test_worker import cfg, make_worker, png, request, serve_all  # noqa: F401


class Reporting:
    """A consumer double that reports what the test says about its broker."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down: str | None = None
        self.commit_gate: threading.Event | None = None  # set: commits wait for it

    def next_batch(self, max_messages: int, timeout_s: float) -> list[Any]:
        return self.inner.next_batch(max_messages, timeout_s)

    def commit(self, messages: list[Any]) -> None:
        if self.commit_gate is not None:
            self.commit_gate.wait(30)
        self.inner.commit(messages)

    def redeliver(self, messages: list[Any]) -> None:
        self.inner.redeliver(messages)

    def close(self) -> None:
        self.inner.close()

    def outage(self) -> str | None:
        return self.down


def served(cfg: Any) -> tuple[Any, Any, Any, Any, HealthServer]:  # noqa: F811
    worker, broker, consumer, producer = make_worker(cfg)
    metrics = Metrics("memory")
    metrics.set_model("fake", "000000000000")
    reporting = Reporting(consumer)
    wrapped = InstrumentedConsumer(reporting, metrics)
    worker.stats.broker_state = "connected"  # what Worker._connect sets
    server = HealthServer(0, worker, metrics, host="127.0.0.1").start()
    return worker, reporting, wrapped, producer, server


def readyz(server: HealthServer) -> tuple[int, str]:
    return get(f"http://127.0.0.1:{server.port}/readyz")


def test_both_adapters_and_the_instrumented_consumer_report_outages() -> None:
    from fmnist.brokers.pubsub.consumer import PubsubConsumer

    for cls in (KafkaTopicConsumer, PubsubConsumer, InstrumentedConsumer):
        assert callable(getattr(cls, "outage", None)), cls
    assert isinstance(InstrumentedConsumer(Reporting(None), Metrics("m")), OutageReporting)


def test_an_unreachable_broker_turns_readyz_503_and_back_by_itself(cfg, caplog) -> None:  # noqa: F811
    worker, reporting, consumer, producer, server = served(cfg)
    try:
        worker.serve_once(consumer, producer)
        assert readyz(server) == (200, "ready\n")
        caplog.set_level(logging.INFO, "fmnist.serving.worker")
        reporting.down = "Kafka at k:9092: 1/1 brokers are down"
        for _ in range(3):
            worker.serve_once(consumer, producer)
        assert readyz(server) == (503, "not ready: Kafka at k:9092: 1/1 brokers are down\n")
        assert get(f"http://127.0.0.1:{server.port}/healthz")[0] == 200  # alive all along
        status = json.loads(get(f"http://127.0.0.1:{server.port}/status")[1])
        assert status["ready"] is False and status["not_ready_because"].startswith("Kafka at")
        reporting.down = None
        worker.serve_once(consumer, producer)
        assert readyz(server) == (200, "ready\n")
        producer.publish([request(png(30), "after")], 1)  # and it serves
        serve_all(worker, consumer, producer)
        assert worker.stats.ok == 1
        lines = [r.getMessage() for r in caplog.records]
        assert sum("not ready: Kafka" in line for line in lines) == 1, lines  # once, not per turn
        assert sum("ready again" in line for line in lines) == 1, lines
    finally:
        server.stop()


def test_a_loop_held_in_a_commit_turns_readyz_503_while_healthz_stays_200(
        cfg, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setattr(metrics_module, "BROKER_WAIT_OVERDUE_S", 0.3)
    worker, reporting, consumer, producer, server = served(cfg)
    reporting.commit_gate = threading.Event()
    producer.publish([request(png(30), "held")], 1)
    loop = threading.Thread(target=serve_all, args=(worker, consumer, producer))
    try:
        loop.start()  # answers, then commits: the commit does not return until let
        code, text = poll_until(lambda: (r := readyz(server))[0] == 503 and r, 10,
                                message="/readyz 503 while the commit hangs")
        assert "waiting" in text and "commit" in text, text
        assert get(f"http://127.0.0.1:{server.port}/healthz")[0] == 200
    finally:
        reporting.commit_gate.set()
        loop.join(10)
    assert readyz(server) == (200, "ready\n")
    server.stop()


def test_no_model_is_not_ready(cfg) -> None:  # noqa: F811
    worker, *_ = make_worker(cfg)
    worker.stats.broker_state = "connected"
    server = HealthServer(0, worker, Metrics("memory"), host="127.0.0.1").start()
    try:
        assert readyz(server) == (503, "not ready: model not loaded\n")
    finally:
        server.stop()


class _Broker:
    address = "127.0.0.1:9092"


def kafka_member() -> KafkaTopicConsumer:
    """The Kafka consumer's report handling, without a connection (it is not made here)."""
    member = object.__new__(KafkaTopicConsumer)
    member.broker, member.topic, member.group = _Broker(), "req", "workers"  # type: ignore[assignment]
    member._outage, member._joining, member._starts = None, True, {}
    return member


def stats(**states: str) -> str:
    sources = {"GroupCoordinator": "logical", ":0/internal": "internal"}
    return json.dumps({"brokers": {name: {"state": state, "source": sources.get(name, "learned")}
                                   for name, state in states.items()}})


def test_kafka_member_is_not_ready_until_its_group_assigns_it_partitions() -> None:
    member = kafka_member()
    member._connections(stats(**{"127.0.0.1:9092/1": "UP", "GroupCoordinator": "UP"}))
    assert member.outage() == "joining consumer group workers"
    member._assigned(None, [])  # more members than partitions: an empty share is a share
    assert member.outage() is None


def test_kafka_member_reads_all_brokers_down_and_recovery_from_librdkafka() -> None:
    member = kafka_member()
    member._assigned(None, [])
    member._connections(stats(**{"127.0.0.1:9092/1": "UP", "GroupCoordinator": "UP"}))
    assert member.outage() is None
    member._client_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    assert member.outage() == "Kafka at 127.0.0.1:9092: 1/1 brokers are down"
    # Statistics that still show nothing up keep it (and keep the first reason given).
    member._connections(stats(**{"127.0.0.1:9092/bootstrap": "INIT", ":0/internal": "UP"}))
    assert member.outage() == "Kafka at 127.0.0.1:9092: 1/1 brokers are down"
    member._connections(stats(**{"127.0.0.1:9092/1": "UP", "GroupCoordinator": "UP"}))
    assert member.outage() is None
    # A connection lost with no error reported (statistics alone) is an outage too.
    member._connections(stats(**{"127.0.0.1:9092/1": "TRY_CONNECT", "GroupCoordinator": "INIT"}))
    assert member.outage() == "Kafka at 127.0.0.1:9092: no broker connection is up"


def test_kafka_member_ignores_errors_that_are_not_about_reaching_the_broker() -> None:
    member = kafka_member()
    member._assigned(None, [])
    member._client_error(KafkaError(KafkaError._MAX_POLL_EXCEEDED, "poll interval exceeded"))
    assert member.outage() is None
    member._fetch_error(KafkaError(KafkaError._TRANSPORT, "connection reset"))
    assert member.outage() == "Kafka at 127.0.0.1:9092: reading req: connection reset"
