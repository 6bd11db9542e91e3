"""The job worker (`fmnist serve --jobs`): takes training and evaluation jobs from the jobs
topic one at a time, publishes their progress and result, and acknowledges a job only once it
has ended and its result is confirmed.

Delivery: the job workers share one consumer group (Kafka) or subscription (Pub/Sub), so a job
goes to one of them. It holds the job for as long as it runs (``MAX_JOB_HOLD_S``); if the
process dies the broker gives the job to a worker again, which resumes training from the last
completed epoch when it finds that epoch's checkpoint (docs/jobs.md#durability).
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from fmnist import logs
from fmnist.brokers import Broker, Consumer, Producer, connect
from fmnist.brokers.base import Message
from fmnist.config import Config
from fmnist.errors import BrokerError, Cancelled, FmnistError, Interrupted
from fmnist.jobs import history, runner
from fmnist.jobs.protocol import (
    Job,
    JobRejected,
    dead_letter,
    event,
    event_message,
    job_config,
    parse_event,
    parse_job,
)
from fmnist.serving.worker import BACKOFF_FIRST_S, BACKOFF_MAX_S, default_worker_id

log = logging.getLogger("fmnist.jobs.worker")
# librdkafka's ceiling for max.poll.interval.ms; far above any job's length here.
MAX_JOB_HOLD_S = 86_400.0


class CancelWatcher:
    """Follows the events topic in a thread and remembers which jobs were asked to stop."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.cancelled: set[str] = set()
        self.error: BrokerError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fmnist-cancels", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self.consumer.next_batch(500, timeout_s=0.5)
            except BrokerError as exc:  # reported by the job loop's next broker call
                self.error = exc
                return
            for message in batch:
                e = parse_event(message)
                if e is not None and e["type"] == "cancel_requested":
                    self.cancelled.add(e["job_id"])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.consumer.close()


class JobWorker:
    def __init__(self, cfg: Config, broker: Broker, worker_id: str | None = None) -> None:
        self.cfg, self.broker = cfg, broker
        self.worker_id = worker_id or cfg.serve.worker_id or default_worker_id()
        self.group = broker.worker_group(cfg.jobs.topic)
        self.stop_event = threading.Event()
        self.running: str | None = None  # the job id in progress
        self.jobs_done = 0

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        """Take jobs until ``stop()``; survive broker outages with capped backoff."""
        backoff = BACKOFF_FIRST_S
        while not self.stop_event.is_set():
            clients: tuple[Consumer, Producer, CancelWatcher] | None = None
            try:
                clients = self._connect()
                backoff = BACKOFF_FIRST_S
                consumer, producer, cancels = clients
                while not self.stop_event.is_set():
                    if cancels.error is not None:
                        raise cancels.error
                    for message in consumer.next_batch(1, timeout_s=0.5):
                        self.handle(message, consumer, producer, cancels)
            except BrokerError as exc:
                log.warning("broker problem: %s; retrying in %.1f s", exc.message, backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            finally:
                if clients is not None:
                    for closable in clients:
                        _close_quietly(closable)

    def _connect(self) -> tuple[Consumer, Producer, CancelWatcher]:
        jobs = self.cfg.jobs
        self.broker.check(self.cfg.broker.connect_timeout_s)
        if self.cfg.broker.create_topics:
            self.broker.ensure_topics([jobs.topic, jobs.events_topic, jobs.dlq_topic])
        cancels = CancelWatcher(self.broker.consumer(jobs.events_topic))
        producer = self.broker.producer()
        consumer = self.broker.consumer(jobs.topic, group=self.group, max_in_flight=1,
                                        max_hold_s=MAX_JOB_HOLD_S)
        log.info("job worker %s takes jobs from %s (group %s)", self.worker_id, jobs.topic,
                 self.group)
        return consumer, producer, cancels

    def _publish(self, producer: Producer, job_id: str, event_type: str, wait: bool = False,
                 **fields: Any) -> None:
        message = event_message(self.cfg.jobs.events_topic,
                                event(job_id, event_type, worker_id=self.worker_id, **fields))
        timeout = self.cfg.broker.connect_timeout_s
        if wait:
            producer.publish([message], timeout_s=timeout)
        else:
            producer.send([message], timeout_s=timeout)

    def handle(self, message: Message, consumer: Consumer, producer: Producer,
               cancels: CancelWatcher) -> None:
        """One job, from its message to its acknowledgement."""
        try:
            job = parse_job(message, self.cfg.jobs.max_job_bytes)
        except JobRejected as rejected:
            self._reject(message, rejected, consumer, producer)
            return
        state = history.fold(history.read(self.broker, self.cfg.jobs.events_topic)).get(
            job.job_id)
        if state is not None and state.ended:  # its result was confirmed, its commit was not
            log.info("job %s already %s; acknowledging the repeated delivery", job.job_id,
                     state.status)
            consumer.commit([message])
            return
        attempt = (state.attempts if state else 0) + 1
        if (state is not None and state.cancel_requested) or job.job_id in cancels.cancelled:
            self._end(job, producer, consumer, message, "cancelled", attempt,
                      error={"code": "cancelled", "message": "Cancelled before it started.",
                             "exit_code": 130})
            return
        folder = runner.checkpoint_dir(self.cfg, job)
        self._publish(producer, job.job_id, "started", kind=job.kind, attempt=attempt,
                      resumed_from_epoch=runner.resumable_epoch(folder))
        log.info("job %s (%s, attempt %d) started", job.job_id, job.kind, attempt)
        self.running = job.job_id

        def stop() -> str | None:
            if job.job_id in cancels.cancelled:
                return "cancelled"
            return "interrupted" if self.stop_event.is_set() else None

        def publish(event_type: str, fields: dict[str, Any]) -> None:
            self._publish(producer, job.job_id, event_type, attempt=attempt, **fields)

        fields: dict[str, Any] = {}
        try:
            cfg = job_config(self.cfg, job)
            fields = runner.run(cfg, job, publish, folder, stop)
            if job.kind == "train" and cfg.registry.publish_trained:
                fields.update(runner.publish_trained(cfg, self.broker,
                                                     Path(fields["model"]["weights"]), job.job_id))
            status, error = "succeeded", None
        except Cancelled as exc:
            status, error = "cancelled", {"code": "cancelled", "message": exc.message,
                                          "exit_code": 130}
        except Interrupted as exc:  # this worker is stopping: the job goes to the next one
            self._publish(producer, job.job_id, "interrupted", wait=True, attempt=attempt,
                          reason=exc.message, resumes_from_epoch=runner.resumable_epoch(folder))
            consumer.redeliver([message])
            log.info("job %s interrupted; it is delivered again", job.job_id)
            return
        except BrokerError:
            raise
        except Exception as exc:  # a job's own failure must never take the worker down
            if isinstance(exc, (FmnistError, JobRejected)):
                log.warning("job %s failed: %s", job.job_id, exc)
            else:
                log.exception("job %s failed", job.job_id)
            status, error = "failed", runner.failure(exc)
        finally:
            self.running = None
        self._end(job, producer, consumer, message, status, attempt, error=error, **fields)
        shutil.rmtree(folder, ignore_errors=True)

    def _end(self, job: Job, producer: Producer, consumer: Consumer, message: Message,
             status: str, attempt: int, error: dict[str, Any] | None = None,
             **fields: Any) -> None:
        """The result event, confirmed; only then the job's acknowledgement."""
        self._publish(producer, job.job_id, "result", wait=True, kind=job.kind, status=status,
                      attempt=attempt, error=error, **fields)
        consumer.commit([message])
        self.jobs_done += 1
        log.info("job %s %s%s", job.job_id, status,
                 f": {error['code']}: {error['message']}" if error else "")

    def _reject(self, message: Message, rejected: JobRejected, consumer: Consumer,
                producer: Producer) -> None:
        """A job message that cannot run: dead-lettered with why, its watchers told, once."""
        out = [dead_letter(message, rejected, self.cfg.jobs.dlq_topic, self.worker_id)]
        if rejected.job_id:
            out.append(event_message(self.cfg.jobs.events_topic, event(
                rejected.job_id, "result", worker_id=self.worker_id, status="failed",
                error=runner.failure(rejected))))
        producer.publish(out, timeout_s=self.cfg.broker.connect_timeout_s)
        consumer.commit([message])
        log.warning("job message %s dead-lettered: %s: %s", message.source_id, rejected.code,
                    rejected.message)


def _close_quietly(client: Any) -> None:
    try:
        client.close()
    except Exception:  # closing a broken client may fail too
        pass


def serve_jobs(cfg: Config) -> None:
    """`fmnist serve --jobs`: a job worker until SIGINT/SIGTERM. The first signal stops the job
    in progress at its next batch (its checkpoint stays; the job is delivered again); a second
    exits at once."""
    worker_id = cfg.serve.worker_id or default_worker_id()
    logs.setup(cfg.serve.log_format, cfg.serve.log_level, worker_id)
    broker = connect(cfg.serve.broker, cfg)
    worker = JobWorker(cfg, broker, worker_id)

    def handle(signum: int, frame: FrameType | None) -> None:
        if worker.stop_event.is_set():
            import os

            os._exit(130)
        log.info("%s received: stopping%s", signal.Signals(signum).name,
                 f" job {worker.running} at its next batch" if worker.running else "")
        worker.stop()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    started = time.monotonic()
    try:
        worker.run()
    finally:
        broker.close()
    log.info("stopped after %d job(s) in %.0f s", worker.jobs_done, time.monotonic() - started)
