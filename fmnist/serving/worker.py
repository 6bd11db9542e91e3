"""The worker's supervisor: connects to the broker (and reconnects with capped backoff), turns
the delivery pipeline until asked to stop, then drains it.

A worker is three parts: the ``handler`` turns requests into answers (no broker), the
``pipeline`` moves them through the broker in the at-least-once order, and this supervisor
keeps the pipeline connected. ``serve`` wires signals, hot reload and health around it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from fmnist.brokers import Broker, Consumer, Producer
from fmnist.config import Config
from fmnist.errors import BrokerError
from fmnist.serving.handler import BatchHandler
from fmnist.serving.pipeline import Observer, Pipeline, Stats

log = logging.getLogger("fmnist.serving.worker")
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 10.0


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    def __init__(self, cfg: Config, broker: Broker, handler: BatchHandler,
                 group: str | None = None, observers: list[Observer] | None = None,
                 freeze_heap: bool = False) -> None:
        self.cfg = cfg
        self.broker = broker
        self.handler = handler
        self.group = group or broker.worker_group()
        self.worker_id = handler.worker_id
        self.stats = Stats()
        self.stop_event = threading.Event()
        self.observers: list[Observer] = observers if observers is not None else []
        self.pipeline = Pipeline(cfg, handler, self.stats, broker.ensure_topics, self.observers)
        # serve: the model's objects are kept out of the garbage collector's scans
        # (runtime.freeze_heap, docs/decisions.md#gc-freeze), again after each hot reload.
        self._freeze_heap = freeze_heap
        self._frozen_with: object = None
        self._outage: str | None = None  # the last outage() the consumer reported
        self._was_ready = False  # whether this consumer has reported no outage yet

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        """Serve until ``stop()``; survive broker outages with capped exponential backoff."""
        backoff = BACKOFF_FIRST_S
        consumer: Consumer | None = None
        producer: Producer | None = None
        while not self.stop_event.is_set():
            try:
                if consumer is None or producer is None:
                    consumer, producer = self._connect()
                    backoff = BACKOFF_FIRST_S
                self.serve_once(consumer, producer)
            except BrokerError as exc:
                # What was in flight is not committed: the broker delivers it again to the
                # consumer that replaces this one (or to another member of the group).
                self.pipeline.reset()
                self.stats.broker_state = f"unavailable, retrying in {backoff:.1f} s"
                log.warning("broker problem: %s; retrying in %.1f s", exc.message, backoff)
                _close_quietly(consumer, producer)
                consumer = producer = None
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        try:
            if consumer is not None and producer is not None:
                self.flush(consumer, producer)  # drain: the last batches answered, committed
        except BrokerError as exc:
            log.warning("the last batch was not confirmed (%s); it will be delivered again",
                        exc.message)
        finally:
            for closable in (consumer, producer):
                if closable is not None:
                    closable.close()

    def _connect(self) -> tuple[Consumer, Producer]:
        self.stats.broker_state = "connecting"
        self._outage, self._was_ready = None, False  # a new consumer: nothing known yet
        broker, routes = self.broker, self.cfg.broker
        broker.check(routes.connect_timeout_s)
        if routes.create_topics:
            broker.ensure_topics([routes.request_topic, routes.response_topic, routes.dlq_topic,
                                  self.cfg.feedback.topic])  # labelled requests' records
        producer = broker.producer()
        consumer = broker.consumer(routes.request_topic, group=self.group,
                                   max_in_flight=4 * self.cfg.serve.max_batch_size)
        self.stats.broker_state = "connected"
        return consumer, producer

    def serve_once(self, consumer: Consumer, producer: Producer) -> int:
        """One turn of the pipeline (``Pipeline.turn``); returns the new batch's size."""
        received = self.pipeline.turn(consumer, producer)
        self._note_outage(consumer)
        self._maybe_freeze_heap()
        return received

    def _note_outage(self, consumer: Consumer) -> None:
        """Keep ``stats.broker_state`` (what /readyz and the status line show) in step with what
        the consumer knows of its broker; log the changes after it was first ready, not every
        turn (a Kafka member joining its group at start is not news)."""
        report = getattr(consumer, "outage", None)  # see brokers.base.OutageReporting; getattr: every turn
        outage = report() if report is not None else None
        was_ready, self._was_ready = self._was_ready, self._was_ready or outage is None
        if outage == self._outage:
            return
        if outage is None:
            if was_ready:
                log.info("ready again: %s answers", self.broker.address)
            self.stats.broker_state = "connected"
        else:
            if self._outage is None and was_ready:
                log.warning("not ready: %s; waiting for it to come back", outage)
            self.stats.broker_state = outage
        self._outage = outage

    def flush(self, consumer: Consumer, producer: Producer) -> None:
        """Answer the batch prepared, then confirm and commit everything sent."""
        self.pipeline.flush(consumer, producer)

    def _maybe_freeze_heap(self) -> None:
        """``runtime.freeze_heap`` at start and after a hot reload, once no batch holds the model
        swapped out (frozen, its reference cycles could never be freed)."""
        model = self.handler.model
        if not self._freeze_heap or self._frozen_with is model:
            return
        prepared = self.pipeline.prepared
        if prepared is not None and prepared.model is not model:
            return
        from fmnist.runtime import freeze_heap

        self._frozen_with = model  # first: this was the last reference to the old
        freeze_heap()


def _close_quietly(*clients: Consumer | Producer | None) -> None:
    for client in clients:
        try:
            if client is not None:
                client.close()
        except Exception:  # closing a broken client may fail too
            pass


