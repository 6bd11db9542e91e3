"""Metrics, health endpoints and hot reload, against the worker's logic with doubles."""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from fmnist.errors import ModelError
from fmnist.logs import JsonFormatter
from fmnist.serving.metrics import (
    LATENCY_BUCKETS,
    BatchHistogram,
    HealthServer,
    InstrumentedConsumer,
    Metrics,
)
from fmnist.serving.reload import Reloader
from fmnist.testing.waiting import http_get as get
from tests.fakes import BrightnessPredictor
from tests.unit.test_worker import REQ, RES, cfg, make_worker, png, request  # noqa: F401


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            if line.startswith(name + " ") or name.endswith("}"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def test_counters_move_by_exactly_the_requests_answered(cfg) -> None:  # noqa: F811
    worker, broker, consumer, producer = make_worker(cfg)
    metrics = Metrics("memory")
    metrics.set_model("fake", "000000000000")
    worker.observers.append(metrics.observe)
    producer.publish([request(png(30), f"ok{i}", sent_at="1") for i in range(7)]
                     + [request(b"", "empty"), request(b"junk", "junk")], 1)
    while worker.serve_once(consumer, producer):  # batches of at most 8
        pass
    server = HealthServer(0, worker, metrics, host="127.0.0.1").start()
    try:
        worker.stats.broker_state = "connected"
        code, text = get(f"http://127.0.0.1:{server.port}/metrics")
        assert code == 200
        assert sample(text, 'fmnist_requests_total{broker="memory",outcome="ok"}') == 7
        assert sample(text, 'fmnist_requests_total{broker="memory",outcome="error"}') == 2
        assert sample(text, 'fmnist_errors_total{code="empty_payload"}') == 1
        assert sample(text, 'fmnist_errors_total{code="unsupported_format"}') == 1
        assert sample(text, "fmnist_batch_size_count") == 2
        assert sample(text, "fmnist_batch_size_sum") == 9
        assert sample(text, "fmnist_end_to_end_seconds_count") == 7
        assert 'fmnist_model_info{name="fake",version="000000000000"} 1.0' in text
        assert get(f"http://127.0.0.1:{server.port}/healthz")[0] == 200
        assert get(f"http://127.0.0.1:{server.port}/readyz")[0] == 200
        status = json.loads(get(f"http://127.0.0.1:{server.port}/status")[1])
        assert status["processed"] == 9 and status["errors"] == 2 and status["ready"] is True
    finally:
        server.stop()


def test_a_batch_histogram_exposes_what_prometheus_clients_histogram_does() -> None:
    """Same values, one batch at a time against one at a time: the same text, bounds included
    (a value equal to a bound counts in that bucket)."""
    values = np.array([0.0, 0.0005, 0.0007, 0.002, 0.0199, 0.5, 3.0, 10.0, 11.0, 250.0])
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("fmnist_x_seconds", "A test.", LATENCY_BUCKETS, ours)
    single = Histogram("fmnist_x_seconds", "A test.", buckets=LATENCY_BUCKETS, registry=theirs)
    batch.observe_many(values[:4])
    batch.observe_many(values[4:])
    batch.observe_many(np.array([]))
    for value in values:
        single.observe(value)
    lines = [line for line in generate_latest(theirs).decode().splitlines()
             if "_created" not in line]
    assert generate_latest(ours).decode().splitlines() == lines


def test_health_turns_red_when_the_loop_is_stuck_and_ready_needs_the_broker(cfg) -> None:  # noqa: F811
    worker, *_ = make_worker(cfg)
    server = HealthServer(0, worker, Metrics("memory"), host="127.0.0.1").start()
    try:
        worker.stats.broker_state = "unavailable, retrying in 2.0 s"
        code, text = get(f"http://127.0.0.1:{server.port}/readyz")
        assert code == 503 and "unavailable" in text
        worker.stats.last_loop -= 120  # nothing has polled for two minutes
        assert get(f"http://127.0.0.1:{server.port}/healthz")[0] == 503
    finally:
        server.stop()


def test_reload_swaps_a_good_model_and_refuses_a_broken_one(tmp_path) -> None:
    weights = tmp_path / "m.keras"
    weights.write_bytes(b"v1")
    (tmp_path / "m.meta.json").write_text("{}")
    serving, results = [], []
    new_model = BrightnessPredictor()

    def load(path):
        if path.read_bytes() == b"broken":
            raise ModelError("incompatible")
        return new_model

    reloader = Reloader(weights, load, serving.append, on_result=results.append, watch=False)
    assert reloader.reload_now() is True
    assert serving == [new_model] and results == ["ok"]
    weights.write_bytes(b"broken")
    assert reloader.reload_now() is False
    assert serving == [new_model] and results == ["ok", "refused"]


def test_json_logs_carry_event_level_worker_and_request_id() -> None:
    record = logging.LogRecord("fmnist.serving.worker", logging.WARNING, __file__, 1, "bad %s", ("x",),
                               None)
    record.request_id = "r-1"
    line = json.loads(JsonFormatter("w-9").format(record))
    assert line["event"] == "bad x" and line["level"] == "warning"
    assert line["worker_id"] == "w-9" and line["request_id"] == "r-1"
    assert line["ts"].endswith("Z")


def test_in_flight_counts_received_until_committed_and_lag_is_fed(cfg) -> None:  # noqa: F811
    worker, broker, consumer, producer = make_worker(cfg)
    metrics = Metrics("memory")
    consumer.lag = lambda: {(REQ, 0): 3}  # the memory double has no lag() of its own
    wrapped = InstrumentedConsumer(consumer, metrics)
    producer.publish([request(png(30), f"r{i}") for i in range(5)], 1)
    got = wrapped.next_batch(5, 0.1)
    text = generate_latest(metrics.registry).decode()
    assert sample(text, "fmnist_in_flight_requests") == 5
    assert sample(text, 'fmnist_kafka_consumer_lag{partition="0",topic="req_predict"}') == 3
    wrapped.commit(got[:3])
    wrapped.redeliver(got[3:])
    assert sample(generate_latest(metrics.registry).decode(), "fmnist_in_flight_requests") == 0
    wrapped.close()
    assert "fmnist_kafka_consumer_lag{" not in generate_latest(metrics.registry).decode()
    assert metrics.last_beat > 0


def test_lag_is_asked_again_at_once_while_the_consumer_knows_none(cfg) -> None:  # noqa: F811
    """librdkafka joins its group in the background: the first ask may find no partitions yet.
    That must not hold the first figures back for a whole refresh interval."""
    worker, broker, consumer, producer = make_worker(cfg)
    metrics = Metrics("memory")
    answers = iter([{}, {(REQ, 1): 4}, {(REQ, 1): 9}])
    consumer.lag = lambda: next(answers)
    wrapped = InstrumentedConsumer(consumer, metrics)
    for _ in range(3):  # well inside one LAG_EVERY_S
        wrapped.next_batch(1, 0.0)
    # the second ask came at once; the third waits for the interval
    assert sample(generate_latest(metrics.registry).decode(),
                  'fmnist_kafka_consumer_lag{partition="1",topic="req_predict"}') == 4


def test_a_change_is_loaded_once_after_it_settles_and_sighup_forces_one(tmp_path) -> None:
    weights = tmp_path / "m.keras"
    weights.write_bytes(b"v1")
    (tmp_path / "m.meta.json").write_text("{}")
    loads = []
    done = threading.Event()

    def load(path):
        loads.append(path.read_bytes())
        done.set()
        return BrightnessPredictor()

    reloader = Reloader(weights, load, lambda p: None, interval_s=0.05).start()
    try:
        (tmp_path / "m.meta.json").write_text('{"v": 2}')
        weights.write_bytes(b"v2")
        assert done.wait(5)
        time.sleep(0.3)  # several more polls: no second load of the same files
        assert loads == [b"v2"]
        done.clear()
        reloader.request()
        assert done.wait(5) and loads == [b"v2", b"v2"]
    finally:
        reloader.stop()
