"""`fmnist serve`: wire the worker to a broker, signals, logs and the live status line.

SIGINT/SIGTERM ask the loop to stop after the batch in flight is answered and committed (exit
0); a second signal exits at once (130), for when draining is not what you want.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from types import FrameType

from fmnist import logs
from fmnist.brokers import connect
from fmnist.config import Config
from fmnist.registry.follower import Announcer, Follower, starting_model
from fmnist.registry.store import open_store
from fmnist.serving import crashes
from fmnist.serving.handler import PredictionHandler
from fmnist.serving.metrics import HealthServer, InstrumentedBroker, Metrics
from fmnist.serving.reload import Reloader
from fmnist.serving.worker import Worker, default_worker_id

log = logging.getLogger("fmnist.serving.serve")


def install_signal_handlers(worker: Worker) -> None:
    def handle(signum: int, frame: FrameType | None) -> None:
        if worker.stop_event.is_set():
            os._exit(130)  # second signal: no more draining
        log.info("%s received: finishing the batch in flight, then exiting",
                 signal.Signals(signum).name)
        worker.stop()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


def serve(cfg: Config, live_status: bool = True, reload: bool = False) -> None:
    from fmnist.model.predictor import Predictor

    worker_id = cfg.serve.worker_id or default_worker_id()
    logs.setup(cfg.serve.log_format, cfg.serve.log_level, worker_id)

    def load(path: Path) -> Predictor:
        return Predictor.configured(cfg, cfg.serve.max_batch_size, path)

    broker = connect(cfg.serve.broker, cfg)
    metrics = Metrics(cfg.serve.broker)
    group = broker.worker_group()
    # First: what dead workers had in flight goes out before this one takes requests.
    guarded = crashes.guard(cfg, broker, group, worker_id)

    def refused(name: str, version: str, reason: str) -> None:
        metrics.model_refusals.labels(reason=reason).inc()
        metrics.last_refusal.clear()
        metrics.last_refusal.labels(name=name, version=version, reason=reason).set_to_current_time()

    # With registry.follow the worker starts on, and follows, the promoted version of
    # model.name (fmnist.registry.follower); otherwise it serves its local weights.
    store = announcer = None
    if cfg.registry.follow:
        store = open_store(cfg, broker)
        announcer = Announcer(cfg, broker, worker_id, on_refusal=refused)
    predictor, generation = starting_model(cfg, store, load, announcer)
    log.info("model %s@%s loaded and warmed in %.2f s (%s backend)", predictor.name,
             predictor.version, predictor.load_seconds, predictor.backend)
    log.info("forward pass ms per call by batch shape: %s", predictor.bucket_ms)
    metrics.set_model(predictor.name, predictor.version)
    handler = PredictionHandler(cfg, predictor, worker_id)
    worker = Worker(cfg, InstrumentedBroker(broker, metrics), guarded.around(handler),
                    group=group, freeze_heap=True)
    install_signal_handlers(worker)
    worker.observers.append(metrics.observe)
    health = None
    if cfg.serve.metrics_port:
        host = cfg.serve.metrics_host
        health = HealthServer(cfg.serve.metrics_port, worker, metrics, host=host).start()
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # where a local client asks
        log.info("metrics and health on http://%s:%d/metrics (/healthz, /readyz, /status), "
                 "listening on %s", shown if ":" not in shown else f"[{shown}]", health.port, host)

    def swap(new: Predictor) -> None:
        handler.predictor = new  # the loop reads it once per batch
        metrics.set_model(new.name, new.version)

    reloader = Reloader(cfg.weights_path, load, swap, watch=reload,
                        on_result=lambda r: metrics.reloads.labels(result=r).inc()).start()
    signal.signal(signal.SIGHUP, lambda signum, frame: reloader.request())
    follower = None
    if store is not None and announcer is not None:
        follower = Follower(cfg, broker, store, load, swap, predictor, generation,
                            announcer).start()
    log.info("serving %s on %s -> %s (group %s, max batch %d, max wait %g ms)",
             cfg.serve.broker, cfg.broker.request_topic, cfg.broker.response_topic, worker.group,
             cfg.serve.max_batch_size, cfg.serve.max_wait_ms)
    status = None
    if live_status and cfg.serve.log_format != "json":  # a status line has no place in JSON
        from fmnist.console import ServeStatus

        status = ServeStatus(worker.stats, cfg.serve.broker)
        status.start()
    try:
        worker.run()
    finally:
        reloader.stop()
        if follower:
            follower.stop()
            follower.join(2.0)
        if status:
            status.stop()
        if health:
            health.stop()
        guarded.close()
        broker.close()
    log.info("stopped after %d requests (%d errors)", worker.stats.processed, worker.stats.errors)
