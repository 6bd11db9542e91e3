"""Prometheus metrics and health endpoints of a running worker, on one small HTTP server.

    /metrics   Prometheus text format
    /healthz   200 while the serve loop is alive (it turns red when the loop is stuck)
    /readyz    200 when requests sent now will be answered: the loop alive, the model loaded,
               the broker connected and, as far as the consumer knows, reachable, and the
               loop not waiting on the broker for longer than ``BROKER_WAIT_OVERDUE_S``
    /status    JSON summary, read by `fmnist status`

Histograms are in seconds, as Prometheus conventions ask. Per-batch figures come from a Worker
observer (``Metrics.observe``); what only the consumer knows (requests held, Kafka lag, that the
loop still polls) comes from ``InstrumentedBroker``, which wraps the broker the worker is given.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from fmnist.brokers import Broker, Consumer, LagReporting, Message, Producer
from fmnist.errors import ConfigError

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STUCK_AFTER_S = 30.0  # the loop polls at least every 0.2 s; 30 s silent means it is stuck
# A broker confirms a batch's answers, or a commit, in milliseconds; one that has not for this
# long is not answering (the wait itself ends at the send's 30 s timeout, a commit's later).
BROKER_WAIT_OVERDUE_S = 5.0
LAG_EVERY_S = 1.0  # how often the serve loop asks its consumer for lag (cheap: see its lag())

log = logging.getLogger("fmnist.serving.metrics")

if TYPE_CHECKING:
    from fmnist.serving.handler import BatchResult
    from fmnist.serving.worker import Worker


class BatchHistogram(Collector):
    """A Prometheus histogram (no labels) observed a batch of values at a time: one
    ``searchsorted`` and ``bincount`` per batch instead of a Python call per value (~3 us a
    request for the two histograms; docs/decisions.md#per-batch-bookkeeping).
    Exposed exactly as ``prometheus_client.Histogram``'s ``_bucket``, ``_count`` and ``_sum``
    samples; a value equal to a bound counts in that bound's bucket (``le``), as there."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = np.array([*buckets, float("inf")], np.float64)
        self._counts = np.zeros(len(self.bounds), np.int64)  # per bucket, not cumulative
        self._sum = 0.0
        self._lock = threading.Lock()  # a scrape reads while the serve loop observes
        registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        if not len(values):
            return
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"),
                             minlength=len(self.bounds))
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def collect(self) -> list[HistogramMetricFamily]:
        with self._lock:
            cumulative, total = np.cumsum(self._counts).tolist(), self._sum
        family = HistogramMetricFamily(self.name, self.documentation, sum_value=total,
                                       buckets=[(_le(b), c) for b, c in
                                                zip(self.bounds.tolist(), cumulative,
                                                    strict=True)])
        return [family]


class Metrics:
    def __init__(self, broker: str) -> None:
        self.broker = broker
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fmnist_requests", "Requests answered, by broker and outcome.",
                                ["broker", "outcome"], registry=r)
        self.errors = Counter("fmnist_errors", "Error responses, by stable error code.", ["code"],
                              registry=r)
        self.queue_wait = BatchHistogram("fmnist_queue_wait_seconds",
                                         "From sent_at (or broker time) to receipt by the "
                                         "worker.", LATENCY_BUCKETS, r)
        self.inference = Histogram("fmnist_inference_seconds", "Forward pass per batch.",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.end_to_end = BatchHistogram("fmnist_end_to_end_seconds",
                                         "From sent_at to the response's publication.",
                                         LATENCY_BUCKETS, r)
        self.batch_size = Histogram("fmnist_batch_size", "Requests per micro-batch.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.in_flight = Gauge("fmnist_in_flight_requests", "Requests received, not yet committed.",
                               registry=r)
        self.lag = Gauge("fmnist_kafka_consumer_lag", "Messages behind the end, per partition.",
                         ["topic", "partition"], registry=r)
        self.model_info = Gauge("fmnist_model_info", "The model being served (value is 1).",
                                ["name", "version"], registry=r)
        self.reloads = Counter("fmnist_model_reloads", "Hot reloads, by result.", ["result"],
                               registry=r)
        # Models from the registry (fmnist.registry.follower): refused before serving, and when
        self.model_refusals = Counter("fmnist_model_refusals", "Models refused before serving "
                                      "(checksum, incompatible, load, canary, fetch), by reason.",
                                      ["reason"], registry=r)
        self.last_refusal = Gauge("fmnist_model_last_refusal_timestamp_seconds",
                                  "When the last model was refused (Unix time), with its version "
                                  "and reason.", ["name", "version", "reason"], registry=r)
        # Labelled requests (fmnist send --label): how often this worker's answers were right
        self.feedback = Counter("fmnist_feedback", "Labelled requests answered, by model "
                                "version and whether the prediction matched the label.",
                                ["name", "version", "outcome"], registry=r)
        self.feedback_accuracy = Gauge("fmnist_feedback_accuracy", "Share of labelled requests "
                                       "answered correctly, per model version.",
                                       ["name", "version"], registry=r)
        self._labelled: dict[tuple[str, str], list[int]] = {}  # version -> [answered, correct]
        self.last_beat = 0.0  # monotonic time the serve loop last polled or dialled the broker
        self.model: dict[str, str] = {}  # what /status names: the model serving now

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def set_model(self, name: str, version: str) -> None:
        self.model = {"name": name, "version": version}
        self.model_info.clear()
        self.model_info.labels(name=name, version=version).set(1)

    def observe(self, messages: list[Message], result: BatchResult) -> None:
        """A Worker observer: called once per confirmed batch. Counters and histograms move
        once per batch (per-request label lookups were 10 us a request, per-request histogram
        observations 3 us: docs/decisions.md#per-batch-bookkeeping)."""
        now = time.time()
        self.batch_size.observe(len(messages))
        self.inference.observe(result.inference_ms / 1000)
        waits, sent_at = [], []
        for message in messages:
            sent = _sent_at_s(message)
            since = sent or (message.broker_time_ms / 1000 if message.broker_time_ms else None)
            if since:
                waits.append(message.received_at - since)
            if sent:
                sent_at.append(sent)
        self.queue_wait.observe_many(np.maximum(np.array(waits), 0.0))
        self.end_to_end.observe_many(np.maximum(now - np.array(sent_at), 0.0))
        failed = 0
        for outcome in result.outcomes:
            if outcome != "ok":
                failed += 1
                self.errors.labels(code=outcome).inc()
        if len(messages) > failed:
            self.requests.labels(broker=self.broker, outcome="ok").inc(len(messages) - failed)
        if failed:
            self.requests.labels(broker=self.broker, outcome="error").inc(failed)
        if result.labelled:
            self._observe_labelled(result.labelled)

    def _observe_labelled(self, labelled: list[tuple[str, str, bool]]) -> None:
        """``fmnist_feedback`` and ``fmnist_feedback_accuracy`` from a batch's labelled
        requests (since this worker started)."""
        for name, version, correct in labelled:
            self.feedback.labels(name=name, version=version,
                                 outcome="correct" if correct else "wrong").inc()
            counts = self._labelled.setdefault((name, version), [0, 0])
            counts[0] += 1
            counts[1] += correct
        for (name, version) in {(n, v) for n, v, _ in labelled}:
            answered, right = self._labelled[(name, version)]
            self.feedback_accuracy.labels(name=name, version=version).set(right / answered)

    def update_lag(self, lag: dict[tuple[str, int], int]) -> None:
        """Replace every lag series: partitions a rebalance took away must not linger."""
        self.lag.clear()
        for (topic, partition), value in lag.items():
            self.lag.labels(topic=topic, partition=str(partition)).set(value)


def _le(bound: float) -> str:
    """A bucket's ``le`` label as prometheus_client writes it (1.0, 0.0005, +Inf)."""
    return "+Inf" if bound == float("inf") else repr(bound)


def _sent_at_s(message: Message) -> float | None:
    try:
        return int(message.headers["sent_at"]) / 1000
    except (KeyError, ValueError):
        return None


class InstrumentedBroker:
    """The broker as the worker sees it: the real one, with its consumers instrumented.

    Everything runs on the serve loop's thread (vendor consumers are not thread-safe), so a
    scrape never touches a client: it reads gauges the loop keeps current.
    """

    def __init__(self, broker: Broker, metrics: Metrics) -> None:
        self.broker = broker
        self.metrics = metrics
        self.name = broker.name
        self.address = broker.address

    def check(self, timeout_s: float) -> None:
        self.metrics.beat()  # the loop is alive while it (re)connects, each step bounded
        self.broker.check(timeout_s)

    def ensure_topics(self, topics: list[str]) -> None:
        self.metrics.beat()
        self.broker.ensure_topics(topics)

    def consumer(self, topic: str, group: str | None = None, from_beginning: bool = False,
                 max_in_flight: int = 1000, max_hold_s: float | None = None
                 ) -> InstrumentedConsumer:
        self.metrics.beat()
        return InstrumentedConsumer(self.broker.consumer(topic, group, from_beginning,
                                                         max_in_flight, max_hold_s), self.metrics)

    def producer(self) -> Producer:
        return self.broker.producer()

    def worker_group(self, topic: str | None = None) -> str:
        return self.broker.worker_group(topic)

    def retained_reader(self, topic: str, max_in_flight: int = 1000) -> Consumer:
        return self.broker.retained_reader(topic, max_in_flight)

    def delete_topics(self, topics: list[str]) -> None:
        self.broker.delete_topics(topics)

    def close(self) -> None:
        self.broker.close()


class InstrumentedConsumer:
    """Feeds ``fmnist_in_flight_requests`` (received, not yet committed or handed back), the
    health heartbeat, and ``fmnist_kafka_consumer_lag`` when the consumer is ``LagReporting``."""

    def __init__(self, consumer: Consumer, metrics: Metrics) -> None:
        self.consumer = consumer
        self.metrics = metrics
        self.held = 0
        self._lag_at = 0.0

    def next_batch(self, max_messages: int, timeout_s: float) -> list[Message]:
        self.metrics.beat()
        messages = self.consumer.next_batch(max_messages, timeout_s)
        self._hold(len(messages))
        self._refresh_lag()
        return messages

    def commit(self, messages: list[Message]) -> None:
        try:
            self.consumer.commit(messages)
        finally:  # committed, or (on failure) to be delivered again: no longer ours either way
            self._hold(-len(messages))

    def redeliver(self, messages: list[Message]) -> None:
        try:
            self.consumer.redeliver(messages)
        finally:
            self._hold(-len(messages))

    def outage(self) -> str | None:
        """The consumer's own report (``brokers.base.OutageReporting``); None from one without."""
        report = getattr(self.consumer, "outage", None)
        return report() if report is not None else None

    def close(self) -> None:
        self._hold(-self.held)
        self.metrics.lag.clear()
        self.consumer.close()

    def _hold(self, n: int) -> None:
        self.held += n
        self.metrics.in_flight.inc(n)

    def _refresh_lag(self) -> None:
        now = time.monotonic()
        if not isinstance(self.consumer, LagReporting) or now - self._lag_at < LAG_EVERY_S:
            return
        self._lag_at = now
        try:
            known = self.consumer.lag()
        except Exception as exc:  # a metric must never stop the serving
            log.debug("consumer lag unavailable: %s", exc)
            return
        self.metrics.update_lag(known)
        if not known:  # nothing known yet (a member still joining its group, no fetch answered
            self._lag_at = 0.0  # yet): ask again at the next batch, not a second later


class _HTTPServer6(ThreadingHTTPServer):
    address_family = socket.AF_INET6  # serve.metrics_host is an IPv6 address ("::", "::1")


class HealthServer:
    """Serves /metrics, /healthz, /readyz and /status for one worker, in a daemon thread."""

    def __init__(self, port: int, worker: Worker, metrics: Metrics, host: str = "0.0.0.0") -> None:
        self.worker = worker
        self.metrics = metrics
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                code, content_type, body = server.route(self.path.split("?")[0])
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes are not worth a log line
                pass

        server_class = _HTTPServer6 if ":" in host else ThreadingHTTPServer
        try:
            self.httpd = server_class((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"The metrics endpoint cannot listen on {host}:{port}: "
                              f"{exc.strerror or exc}.",
                              "Choose a free port (`--metrics-port` / FMNIST_SERVE__METRICS_PORT) "
                              "and an address of this machine (`serve.metrics_host` / "
                              "FMNIST_SERVE__METRICS_HOST: 0.0.0.0 every interface, "
                              "127.0.0.1 this machine only).") from None
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="health",
                                       daemon=True)

    def start(self) -> HealthServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def alive(self) -> bool:
        """The loop polled, or dialled the broker while retrying, within ``STUCK_AFTER_S``."""
        last = max(self.worker.stats.last_loop, self.metrics.last_beat)
        return time.monotonic() - last < STUCK_AFTER_S

    def unready(self) -> str | None:
        """Why requests sent now would not be answered, or None: the worker is ready."""
        s = self.worker.stats
        if not self.alive():
            return "serve loop stuck"
        if s.broker_state != "connected":
            return s.broker_state
        since = s.broker_wait_since  # read once: the serve loop resets it
        if since is not None and (waited := time.monotonic() - since) > BROKER_WAIT_OVERDUE_S:
            return f"waiting {waited:.0f} s for the broker to confirm answers or a commit"
        if not self.metrics.model:
            return "model not loaded"
        return None

    def ready(self) -> bool:
        return self.unready() is None

    def status(self) -> dict[str, Any]:
        s = self.worker.stats
        unready = self.unready()
        return {
            "worker_id": self.worker.worker_id, "broker": self.metrics.broker,
            "broker_state": s.broker_state, "alive": self.alive(), "ready": unready is None,
            "not_ready_because": unready,
            "model": self.metrics.model,
            "processed": s.processed, "ok": s.ok, "errors": s.errors, "batches": s.batches,
            "rate_per_s": round(s.rate(), 2), "error_codes": s.error_codes,
            "latency_ms": {"p50": s.latency_ms(50), "p99": s.latency_ms(99)},
        }

    def route(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)
        if path == "/healthz":
            ok = self.alive()
            return (200 if ok else 503), "text/plain", b"ok\n" if ok else b"serve loop stuck\n"
        if path == "/readyz":
            unready = self.unready()
            return ((200, "text/plain", b"ready\n") if unready is None
                    else (503, "text/plain", f"not ready: {unready}\n".encode()))
        if path == "/status":
            return 200, "application/json", json.dumps(self.status()).encode()
        return 404, "text/plain", b"not found: try /metrics, /healthz, /readyz, /status\n"
