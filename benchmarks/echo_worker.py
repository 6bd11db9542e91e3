"""The broker ceiling: a worker that answers every request with the request's own bytes.

It is fmnist's own ``Worker`` with an echo as its batch handler, so everything else is the
same code (docs/decisions.md#echo-ceiling): the broker adapters from ``fmnist.brokers`` and
their settings (from the same config and ``FMNIST_*`` environment), the micro-batching
(``serve.max_batch_size`` / ``serve.max_wait_ms``), publish-and-confirm before commit, and
SIGTERM draining. No TensorFlow, no decode, no JSON: the best any worker on this broker and
client library can do.

    FMNIST_SERVE__BROKER=kafka python benchmarks/echo_worker.py
"""

from __future__ import annotations

import logging
import sys

from fmnist import config, logs
from fmnist.brokers import Message, OutMessage, connect
from fmnist.serving import protocol
from fmnist.serving.handler import BatchResult, Prepared
from fmnist.serving.serve import install_signal_handlers
from fmnist.serving.worker import Worker, default_worker_id


class EchoHandler:
    """A ``BatchHandler`` that answers each request with its own bytes."""

    model = None  # nothing to swap or to keep out of the garbage collector's scans

    def __init__(self, cfg: config.Config, worker_id: str) -> None:
        self.cfg = cfg
        self.worker_id = worker_id

    def prepare(self, messages: list[Message]) -> Prepared:
        topic = self.cfg.broker.response_topic
        out = []
        for m in messages:
            request_id = m.headers.get(protocol.REQUEST_ID) or m.source_id
            out.append(OutMessage(topic, m.value, key=request_id,
                                  headers={protocol.REQUEST_ID: request_id,
                                           "worker_id": self.worker_id}))
        result = BatchResult(out, ["ok"] * len(messages), 0.0)
        return Prepared(messages, lambda: result, None)


def main() -> int:
    cfg = config.load()
    worker_id = cfg.serve.worker_id or f"echo-{default_worker_id()}"
    logs.setup(cfg.serve.log_format, cfg.serve.log_level, worker_id)
    broker = connect(cfg.serve.broker, cfg)
    worker = Worker(cfg, broker, EchoHandler(cfg, worker_id), freeze_heap=True)  # as `fmnist serve`
    install_signal_handlers(worker)
    logging.getLogger("fmnist.echo").info("echo worker on %s: %s -> %s", cfg.serve.broker,
                                          cfg.broker.request_topic, cfg.broker.response_topic)
    try:
        worker.run()
    finally:
        broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
