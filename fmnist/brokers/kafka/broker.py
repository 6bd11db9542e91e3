"""The Kafka broker: its admin client (topics, metadata, offsets), its one shared producer, and
the Broker interface over them."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from contextlib import AbstractContextManager
from typing import Any

from confluent_kafka import (
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from fmnist.brokers.base import Consumer
from fmnist.brokers.kafka import errors, settings
from fmnist.brokers.kafka.consumer import KafkaTopicConsumer
from fmnist.brokers.kafka.producer import KafkaTopicProducer
from fmnist.config import Config
from fmnist.errors import BrokerError, BrokerTimeout

log = logging.getLogger("fmnist.brokers.kafka")
PRODUCER_WARM_UP_S = 2.0  # at most this long asking a new producer for metadata
# ``check`` asks for metadata in slices this long, and between them looks at what librdkafka
# reported: a refused login fails at once instead of at the end of the connect timeout.
CHECK_SLICE_S = 0.25


class KafkaBroker:
    name = "kafka"

    def __init__(self, cfg: Config) -> None:
        settings.check(cfg.kafka)
        self.cfg = cfg
        self.address = cfg.kafka.bootstrap_servers
        if (missing := errors.credentials_missing(self.address, cfg.kafka)) is not None:
            raise missing
        self.principal = cfg.kafka.sasl_username
        # what librdkafka reported of the login (``_client_error``), for ``check``
        self.login_error: BrokerError | None = None
        self.timeout_ms = max(1000, int(cfg.broker.connect_timeout_s * 1000))
        self._lock = threading.Lock()
        self._admin: Any = None
        self._producer: Any = None
        self._consumers: list[KafkaTopicConsumer] = []

    # -- clients and errors ------------------------------------------------------------------

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings shared by admin, producer and consumers (from ``kafka.*``)."""
        return settings.client_config(self.cfg, self.timeout_ms, self._client_error)

    def _client_error(self, err: KafkaError) -> None:
        errors.client_error(err)
        if err.code() in errors.LOGIN_FAILED:
            self.login_error = errors.login_failed(self.address, self.cfg.kafka, err)

    def _hangs_up(self, deadline: float) -> bool:
        """Whether the first bootstrap server refuses Kafka's first request (ApiVersions v0) in
        plaintext: a TLS listener answers with a TLS alert or hangs up, and librdkafka reports
        nothing but a transport failure at the end of its timeout."""
        host, _, port = self.client_config()["bootstrap.servers"].split(",")[0].rpartition(":")
        header = struct.pack(">hhih", 18, 0, 1, 6) + b"fmnist"
        try:
            with socket.create_connection((host.strip("[]"), int(port)),
                                          timeout=max(0.1, min(1.0, deadline - time.monotonic()))
                                          ) as conn:
                conn.sendall(struct.pack(">i", len(header)) + header)
                reply = conn.recv(4)  # a TLS listener answers with an alert record
                return len(reply) < 4 or reply[:2] in (b"\x15\x03", b"\x16\x03")
        except (OSError, ValueError):
            return False

    def error(self, what: str, exc: BaseException,
              needs: errors.Needs | None = None) -> BrokerError:
        return errors.translate(self.address, what, exc, self.principal, needs)

    def unreachable(self, detail: str) -> BrokerError:
        return errors.unreachable(self.address, detail)

    def translated(self, what: str, needs: errors.Needs | None = None
                   ) -> AbstractContextManager[None]:
        return errors.translated(self.address, what, self.principal, needs)

    def admin(self) -> Any:
        """The one AdminClient (topics, metadata, offsets), created on first use."""
        with self._lock:
            if self._admin is None:
                with self.translated("connect"):
                    self._admin = AdminClient(self.client_config())
            return self._admin

    def shared_producer(self) -> Any:
        """The one Producer (thread-safe), idempotent with acks=all."""
        k = self.cfg.kafka
        with self._lock:
            if self._producer is None:
                with self.translated("connect a producer"):
                    producer = Producer({**self.client_config(),
                                         **settings.producer_config(k, self.timeout_ms)})
                self._producer = producer
                # A new idempotent producer held its first message ~500 ms (measured: 503 ms
                # to the first delivery report, 1.6 ms after this ~55 ms metadata request), so
                # a fresh client's first request and a fresh worker's first answer each waited
                # half a second. Only a warm-up: a broker that is down now fails the sends,
                # as before, not the making of the producer.
                try:
                    producer.list_topics(timeout=PRODUCER_WARM_UP_S)
                except KafkaException as exc:
                    log.debug("producer warm-up skipped: %s", exc)
            return self._producer

    def discard_producer(self, producer: Any) -> None:
        """Forget a producer whose sends were not confirmed; the next send makes a new one.

        An idempotent producer that lost messages can be left in a fatal state (its sequence
        numbers no longer line up); starting over is always safe: the caller sends again
        what failed (the worker redelivers the batch). What the old one still holds is purged.
        """
        with self._lock:
            if self._producer is producer:
                self._producer = None
        producer.purge()
        producer.poll(0)  # the purged messages' reports go to their (finished) confirmations

    def metadata(self) -> Any:
        """The cluster's metadata, every topic (asking for one by name could create it where
        a broker allows auto-creation)."""
        with self.translated("list topics"):
            return self.admin().list_topics(timeout=self.timeout_ms / 1000)

    def partitions(self, topic: str) -> list[int]:
        """The partition ids of ``topic``; BrokerError when it does not exist."""
        found = self.metadata().topics.get(topic)
        if found is None and self.cfg.kafka.security_protocol.upper() != "PLAINTEXT":
            self._describable(topic)
        if found is None or found.error is not None or not found.partitions:
            raise BrokerError(f"Kafka topic {topic} does not exist at {self.address}.",
                              "Create it first (`broker.create_topics: true` does that on start).")
        return sorted(found.partitions)

    def _describable(self, topic: str) -> None:
        """A topic missing from the listing of every topic: a cluster with ACLs leaves out
        those this user may not Describe, and says so when asked for the topic by name
        (DescribeTopics, which never creates a topic). Kafka answers the same for a topic that
        does not exist, so as not to tell that user which topics do."""
        future = self.admin().describe_topics(TopicCollection([topic]),
                                              request_timeout=self.timeout_ms / 1000)[topic]
        try:
            future.result()
        except KafkaException as exc:
            if errors.code_of(exc) in errors.UNAUTHORIZED:
                raise self.error(f"use topic {topic}", exc,
                                 {"Topic": ("Describe", topic)}) from None

    def group_lag(self, group: str, topic: str) -> dict[int, int]:
        """Per partition of ``topic``, how many messages ``group`` has not committed: the end
        offset minus the committed one (from the first retained message where the group has
        no commit). Asked of the broker, so it covers every member of the group."""
        tps = [TopicPartition(topic, p) for p in self.partitions(topic)]
        admin, timeout_s = self.admin(), self.timeout_ms / 1000
        with self.translated(f"read the offsets of group {group} on {topic}",
                             {"Topic": ("Describe", topic), "Group": ("Describe", group)}):
            (done,) = admin.list_consumer_group_offsets(
                [ConsumerGroupTopicPartitions(group, tps)],
                request_timeout=timeout_s).values()
            committed = {tp.partition: tp.offset for tp in done.result().topic_partitions}
            ends = {tp.partition: f.result().offset for tp, f in admin.list_offsets(
                {tp: OffsetSpec.latest() for tp in tps}, request_timeout=timeout_s).items()}
            starts = {tp.partition: f.result().offset for tp, f in admin.list_offsets(
                {tp: OffsetSpec.earliest() for tp in tps}, request_timeout=timeout_s).items()}
        lag = {}
        for p in (tp.partition for tp in tps):
            done_at = committed.get(p, -1)
            lag[p] = max(0, ends[p] - (done_at if done_at >= 0 else starts[p]))
        return lag

    def delete_topics(self, topics: list[str]) -> None:
        """Delete these topics (missing ones are fine)."""
        futures = self.admin().delete_topics(topics, operation_timeout=self.timeout_ms / 1000)
        for topic, future in futures.items():
            try:
                future.result()
            except KafkaException as exc:
                if errors.code_of(exc) not in errors.NO_TOPIC:
                    raise self.error(f"delete topic {topic}", exc,
                                     {"Topic": ("Delete", topic)}) from None

    # -- the Broker interface ----------------------------------------------------------------

    def check(self, timeout_s: float) -> None:
        """Bounded by ``timeout_s``: a plain TCP connect to the bootstrap servers first (fails at
        once, without librdkafka's retries, when nothing listens), then one topic listing."""
        deadline = time.monotonic() + timeout_s
        self._probe(deadline)
        self.login_error = None  # only what this check hears counts
        admin = self.admin()
        while True:
            try:
                admin.list_topics(timeout=max(0.1, min(CHECK_SLICE_S,
                                                       deadline - time.monotonic())))
                return
            except KafkaException as exc:
                admin.poll(0)  # serves librdkafka's error reports (``_client_error``)
                if self.login_error is not None:
                    raise self.login_error from None
                if self.cfg.kafka.security_protocol.upper() in ("PLAINTEXT", "SASL_PLAINTEXT") \
                        and self._hangs_up(deadline):
                    raise errors.plaintext_refused(self.address, self.cfg.kafka) from None
                if time.monotonic() >= deadline or errors.code_of(exc) not in \
                        errors.UNREACHABLE | errors.TIMEOUTS:
                    raise self.error("list topics", exc) from None

    def _probe(self, deadline: float) -> None:
        failures = []
        for server in self.client_config()["bootstrap.servers"].split(","):
            host, sep, port = server.rpartition(":")
            host, port = (host, port) if sep else (server, "9092")
            try:
                with socket.create_connection((host.strip("[]"), int(port)),
                                              timeout=max(0.1, deadline - time.monotonic())):
                    return
            except (OSError, ValueError) as exc:
                failures.append(f"{server}: {getattr(exc, 'strerror', None) or exc}")
        raise self.unreachable("; ".join(failures))

    def ensure_topics(self, topics: list[str], partitions: int | None = None,
                      topic_config: dict[str, str] | None = None) -> None:
        """Create the missing topics (``kafka.partitions``, or ``partitions``, x
        ``kafka.replication_factor``), with ``topic_config`` on top of ours (the model store's
        are compacted)."""
        k = self.cfg.kafka
        existing = self.metadata().topics
        missing = [t for t in dict.fromkeys(topics) if t not in existing]
        if not missing:
            return
        config = {"message.timestamp.type": "LogAppendTime", **(topic_config or {})}
        new = [NewTopic(t, num_partitions=partitions or k.partitions,
                        replication_factor=k.replication_factor, config=config)
               for t in missing]
        with self.translated(f"create topics {', '.join(missing)}",
                             {"Topic": ("Create", missing[0]), "Cluster": ("Create", "kafka-cluster")}):
            futures = self.admin().create_topics(new, operation_timeout=self.timeout_ms / 1000,
                                                 request_timeout=self.timeout_ms / 1000)
        for topic, future in futures.items():
            try:
                future.result()
            except KafkaException as exc:
                if errors.code_of(exc) == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                if errors.code_of(exc) in errors.UNREACHABLE | errors.TIMEOUTS | errors.REFUSED:
                    raise self.error(f"create topic {topic}", exc,
                                     {"Topic": ("Create", topic)}) from None
                raise BrokerError(f"Kafka at {self.address} could not create topic {topic}: "
                                  f"{errors.reason_of(exc)}",
                                  "Check the name ([a-zA-Z0-9._-], at most 249 characters), "
                                  "`kafka.partitions` and `kafka.replication_factor`.") from None
            log.info("created Kafka topic %s (%d partitions)", topic, partitions or k.partitions)
        self._wait_for_topics(missing)

    def _wait_for_topics(self, topics: list[str]) -> None:
        """Until the metadata shows each topic with a leader for every partition: a consumer
        made sooner would find no partitions."""
        deadline = time.monotonic() + self.timeout_ms / 1000
        while True:
            known = self.metadata().topics
            waiting = [t for t in topics if t not in known or known[t].error is not None
                       or any(p.leader < 0 for p in known[t].partitions.values())
                       or not known[t].partitions]
            if not waiting:
                return
            if time.monotonic() >= deadline:
                raise BrokerTimeout(f"Kafka at {self.address} did not show the new topics "
                                    f"{', '.join(waiting)} within {self.timeout_ms / 1000:g} s.",
                                    "Is the broker overloaded? Try again.")
            time.sleep(0.05)  # start-up only, never on a request's path

    def consumer(self, topic: str, group: str | None = None, from_beginning: bool = False,
                 max_in_flight: int = 1000, max_hold_s: float | None = None
                 ) -> KafkaTopicConsumer:
        """A group member of ``group``, or a private reader of all partitions (``group`` None).

        ``max_in_flight`` caps how many records one ``next_batch`` hands out; Kafka has no
        per-message lease to bound beyond that. ``from_beginning`` only matters for a private
        reader (a new group always starts at the earliest message).
        """
        partitions = self.partitions(topic)
        consumer = KafkaTopicConsumer(self, topic, group, from_beginning, partitions,
                                      max(1, max_in_flight), max_hold_s)
        with self._lock:
            self._consumers = [c for c in self._consumers if not c.closed] + [consumer]
        return consumer

    def worker_group(self, topic: str | None = None) -> str:
        """Request workers share the consumer group ``kafka.group_id``; the workers of another
        topic share ``<kafka.group_id>.<topic>``."""
        if topic is None or topic == self.cfg.broker.request_topic:
            return self.cfg.kafka.group_id
        return f"{self.cfg.kafka.group_id}.{topic}"

    def retained_reader(self, topic: str, max_in_flight: int = 1000) -> Consumer:
        """Kafka keeps its log: a private reader from the first retained message; it takes
        nothing away from anyone, and its commits do nothing."""
        return self.consumer(topic, group=None, from_beginning=True, max_in_flight=max_in_flight)

    def producer(self) -> KafkaTopicProducer:
        return KafkaTopicProducer(self)

    def close(self) -> None:
        """Close every consumer made here, then flush the shared producer."""
        with self._lock:
            consumers, self._consumers = self._consumers, []
            producer, self._producer = self._producer, None
            self._admin = None  # nothing to close: it goes with its last reference
        for consumer in consumers:
            consumer.close()
        if producer is not None:
            left = producer.flush(settings.CLOSE_TIMEOUT_S)  # sends what is still lingering
            if left:
                log.warning("Kafka producer closed with %d message(s) unconfirmed", left)

