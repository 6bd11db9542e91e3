"""Apache Kafka behind the Broker interface, with confluent-kafka (librdkafka).

The only module that imports ``confluent_kafka``. How the interface maps onto Kafka:

* a consumer *group* is a Kafka consumer group: workers sharing ``kafka.group_id`` split the
  topic's partitions; offsets are committed by hand (``commit``), never automatically, so a
  request is acknowledged only after its answer is confirmed; a new group starts at the
  earliest retained message;
* ``redeliver`` seeks each partition back to the lowest offset given, so those messages (and
  any after them) are fetched again; Kafka has no per-message acknowledgement;
* a *private reader* (no group) assigns itself every partition of the topic at offsets
  resolved when it is made (the end, or the beginning) and never commits: reading leaves
  nothing behind;
* topics we create use ``message.timestamp.type=LogAppendTime``, so a message's timestamp is
  when the broker stored it (``Message.broker_time_ms``).

Why librdkafka rather than kafka-python: fetching, batching, compression and acknowledgements
run on librdkafka's C threads instead of competing with the worker's loop for the GIL. With
kafka-python, its ``send`` and ``poll`` were over half of the worker's loop at saturation
(BENCHMARKS.md, session 11).

librdkafka retries and reconnects on its own; every call we make is still bounded: admin and
metadata calls by ``broker.connect_timeout_s``, a commit by the socket timeout (the same), a
``Confirmation.wait`` by the ``send``'s timeout. A rebalance never crashes a worker: a commit
the group no longer accepts is logged and dropped (the partition's new owner delivers those
messages again: at-least-once).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from fmnist.brokers.base import Message, OutMessage
from fmnist.config import Config
from fmnist.errors import BrokerError, BrokerTimeout, ConfigError, FmnistError

log = logging.getLogger(__name__)
# librdkafka's own log. It reports at warning level what it retries and recovers from by
# itself (a group coordinator still loading after a broker start, a reconnect); what matters
# also reaches _client_error or fails the call that needed it. So errors only, unless the
# user sets this logger's level.
librdkafka_log = logging.getLogger(f"{__name__}.librdkafka")
if librdkafka_log.level == logging.NOTSET:
    librdkafka_log.setLevel(logging.ERROR)

CLOSE_TIMEOUT_S = 5.0
BROKER_MESSAGE_MAX_BYTES = 1_048_588  # Kafka's default message.max.bytes
SESSION_TIMEOUT_MS = 10_000  # a dead worker's partitions move on after this long
COMPRESSIONS = ("", "gzip", "snappy", "lz4", "zstd")  # all built into librdkafka's wheel
# A rebalance took the partitions away: the commit is refused, the new owner re-delivers.
_REBALANCED = {KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
               KafkaError.UNKNOWN_MEMBER_ID, KafkaError.FENCED_INSTANCE_ID,
               KafkaError.STALE_MEMBER_EPOCH, KafkaError._STATE}
_TIMEOUTS = {KafkaError._TIMED_OUT, KafkaError.REQUEST_TIMED_OUT, KafkaError._MSG_TIMED_OUT,
             KafkaError._TIMED_OUT_QUEUE}
_UNREACHABLE = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE}
_REFUSED = {KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
            KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError.SASL_AUTHENTICATION_FAILED,
            KafkaError._AUTHENTICATION}
_NO_TOPIC = {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC,
             KafkaError._UNKNOWN_PARTITION}
# What a client reports about a topic created a moment ago, until its metadata catches up.
_SETTLING = _NO_TOPIC | {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE}


def _error(exc: BaseException) -> KafkaError | None:
    """The KafkaError inside a KafkaException (None for anything else)."""
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    return err if isinstance(err, KafkaError) else None


def _code(exc: BaseException) -> int | None:
    err = _error(exc)
    return None if err is None else err.code()


def _reason(exc: BaseException) -> str:
    err = _error(exc)
    if err is not None:
        return f"{err.name()}: {err.str()}"
    return str(exc) or type(exc).__name__


class KafkaBroker:
    name = "kafka"

    def __init__(self, cfg: Config) -> None:
        k = cfg.kafka
        if k.compression not in COMPRESSIONS:
            raise ConfigError(f"Invalid config: kafka.compression must be one of "
                              f"{', '.join(repr(c) for c in COMPRESSIONS)}, got {k.compression!r}.",
                              "Fix it in your config file or FMNIST_KAFKA__COMPRESSION.")
        self.cfg = cfg
        self.address = k.bootstrap_servers
        self.timeout_ms = max(1000, int(cfg.broker.connect_timeout_s * 1000))
        self._lock = threading.Lock()
        self._admin: Any = None
        self._producer: Any = None
        self._consumers: list[KafkaTopicConsumer] = []

    # -- clients and errors ------------------------------------------------------------------

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings shared by admin, producer and consumers (from ``kafka.*``)."""
        k = self.cfg.kafka
        conf: dict[str, Any] = {
            "bootstrap.servers": ",".join(s.strip() for s in k.bootstrap_servers.split(",")
                                          if s.strip()),
            "client.id": k.client_id, "security.protocol": k.security_protocol,
            "socket.timeout.ms": self.timeout_ms, "reconnect.backoff.max.ms": 2000,
            # librdkafka logs through ours (``librdkafka_log``), not to stderr; errors it
            # recovers from on its own (a broker restart) reach _client_error. A broker closing
            # an idle connection (the admin client's, after 10 minutes) is not an error.
            "logger": librdkafka_log, "error_cb": _client_error, "log.connection.close": False,
        }
        if k.sasl_mechanism:
            conf.update({"sasl.mechanism": k.sasl_mechanism, "sasl.username": k.sasl_username,
                         "sasl.password": k.sasl_password})
        for key, name in (("ssl_cafile", "ssl.ca.location"),
                          ("ssl_certfile", "ssl.certificate.location"),
                          ("ssl_keyfile", "ssl.key.location")):
            if value := getattr(k, key):
                conf[name] = value
        return conf

    def error(self, what: str, exc: BaseException) -> BrokerError:
        """A confluent-kafka exception as a BrokerError that says what to do next."""
        code, reason = _code(exc), _reason(exc)
        if code in _UNREACHABLE:
            return self.unreachable(f"{what}: {reason}")
        if code in _REFUSED:
            return BrokerError(f"Kafka at {self.address} refused to {what}: {reason}",
                               "Check `kafka.security_protocol`, `kafka.sasl_*` and `kafka.ssl_*` "
                               "(FMNIST_KAFKA__SASL_USERNAME, ...) and the ACLs of that user.")
        if code == KafkaError.MSG_SIZE_TOO_LARGE:
            return BrokerError(f"Kafka at {self.address} refused to {what}: {reason}",
                               "The message is over Kafka's size limit (message.max.bytes, 1 MiB "
                               "by default): send a smaller image (a 28x28 PNG is under 1 KB).")
        if code in _TIMEOUTS:
            return BrokerTimeout(f"Kafka at {self.address} did not answer in time ({what}: "
                                 f"{reason}).", "Is the broker up and not overloaded? "
                                 "`scripts/kafka.sh status` checks the local one.")
        return BrokerError(f"Kafka at {self.address}: could not {what}: {reason}",
                           "Is the broker up? `scripts/kafka.sh status` checks the local one.")

    def unreachable(self, detail: str) -> BrokerError:
        return BrokerError(f"Kafka at {self.address} is not reachable ({detail}).",
                           "Start the local brokers with `scripts/brokers up` (Kafka alone: "
                           "`scripts/kafka.sh up`), or set `--bootstrap-servers` / "
                           "FMNIST_KAFKA__BOOTSTRAP_SERVERS to where your cluster runs.")

    @contextmanager
    def translated(self, what: str) -> Iterator[None]:
        try:
            yield
        except FmnistError:
            raise
        except KafkaException as exc:
            raise self.error(what, exc) from None

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
                    self._producer = Producer({
                        **self.client_config(), "acks": "all", "enable.idempotence": True,
                        "linger.ms": k.linger_ms, "compression.type": k.compression or "none",
                        "message.timeout.ms": max(30_000, k.linger_ms + 2 * self.timeout_ms),
                        # the broker's default limit (1 MiB + overhead), as Java clients have
                        # it; librdkafka's own default is 1,000,000 bytes
                        "message.max.bytes": BROKER_MESSAGE_MAX_BYTES})
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
        if found is None or found.error is not None or not found.partitions:
            raise BrokerError(f"Kafka topic {topic} does not exist at {self.address}.",
                              "Create it first (`broker.create_topics: true` does that on start).")
        return sorted(found.partitions)

    def group_lag(self, group: str, topic: str) -> dict[int, int]:
        """Per partition of ``topic``, how many messages ``group`` has not committed: the end
        offset minus the committed one (from the first retained message where the group has
        no commit). Asked of the broker, so it covers every member of the group."""
        tps = [TopicPartition(topic, p) for p in self.partitions(topic)]
        admin, timeout_s = self.admin(), self.timeout_ms / 1000
        with self.translated(f"read the offsets of group {group} on {topic}"):
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
        """Delete these topics (missing ones are fine); used by the benchmark's clean-up."""
        futures = self.admin().delete_topics(topics, operation_timeout=self.timeout_ms / 1000)
        for topic, future in futures.items():
            try:
                future.result()
            except KafkaException as exc:
                if _code(exc) not in _NO_TOPIC:
                    raise self.error(f"delete topic {topic}", exc) from None

    # -- the Broker interface ----------------------------------------------------------------

    def check(self, timeout_s: float) -> None:
        """Bounded by ``timeout_s``: a plain TCP connect to the bootstrap servers first (fails at
        once, without librdkafka's retries, when nothing listens), then one topic listing."""
        deadline = time.monotonic() + timeout_s
        self._probe(deadline)
        with self.translated("list topics"):
            self.admin().list_topics(timeout=max(0.1, deadline - time.monotonic()))

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

    def ensure_topics(self, topics: list[str]) -> None:
        """Create the missing topics (``kafka.partitions`` x ``kafka.replication_factor``)."""
        k = self.cfg.kafka
        existing = self.metadata().topics
        missing = [t for t in dict.fromkeys(topics) if t not in existing]
        if not missing:
            return
        new = [NewTopic(t, num_partitions=k.partitions, replication_factor=k.replication_factor,
                        config={"message.timestamp.type": "LogAppendTime"}) for t in missing]
        with self.translated(f"create topics {', '.join(missing)}"):
            futures = self.admin().create_topics(new, operation_timeout=self.timeout_ms / 1000,
                                                 request_timeout=self.timeout_ms / 1000)
        for topic, future in futures.items():
            try:
                future.result()
            except KafkaException as exc:
                if _code(exc) == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                if _code(exc) in _UNREACHABLE | _TIMEOUTS | _REFUSED:
                    raise self.error(f"create topic {topic}", exc) from None
                raise BrokerError(f"Kafka at {self.address} could not create topic {topic}: "
                                  f"{_reason(exc)}",
                                  "Check the name ([a-zA-Z0-9._-], at most 249 characters), "
                                  "`kafka.partitions` and `kafka.replication_factor`.") from None
            log.info("created Kafka topic %s (%d partitions)", topic, k.partitions)
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
                 max_in_flight: int = 1000) -> KafkaTopicConsumer:
        """A group member of ``group``, or a private reader of all partitions (``group`` None).

        ``max_in_flight`` caps how many records one ``next_batch`` hands out; Kafka has no
        per-message lease to bound beyond that. ``from_beginning`` only matters for a private
        reader (a new group always starts at the earliest message).
        """
        partitions = self.partitions(topic)
        consumer = KafkaTopicConsumer(self, topic, group, from_beginning, partitions,
                                      max(1, max_in_flight))
        with self._lock:
            self._consumers = [c for c in self._consumers if not c.closed] + [consumer]
        return consumer

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
            left = producer.flush(CLOSE_TIMEOUT_S)  # sends what is still lingering
            if left:
                log.warning("Kafka producer closed with %d message(s) unconfirmed", left)


def _client_error(err: KafkaError) -> None:
    """librdkafka's report of a client-wide error; it retries on its own, so this is a log
    line (what the caller sees is the call that then fails or times out)."""
    level = logging.ERROR if err.fatal() else logging.WARNING
    log.log(level, "Kafka client: %s: %s", err.name(), err.str())


class KafkaTopicProducer:
    """Publishes through the broker's shared producer."""

    def __init__(self, broker: KafkaBroker) -> None:
        self.broker = broker

    def send(self, messages: list[OutMessage], timeout_s: float) -> KafkaConfirmation:
        """Queue all in librdkafka (its threads send them); ``wait`` collects the reports."""
        producer = self.broker.shared_producer()
        deadline = time.monotonic() + timeout_s
        confirmation = KafkaConfirmation(self.broker, producer, messages, timeout_s, deadline)
        report = confirmation.delivered
        produce = producer.produce
        with self.broker.translated(f"send to {messages[0].topic if messages else '-'}"):
            for m in messages:
                key = None if m.key is None else m.key.encode()
                headers = [(name, value.encode()) for name, value in m.headers.items()]
                while True:
                    try:
                        produce(m.topic, m.value, key, headers=headers, on_delivery=report)
                        break
                    except BufferError:  # librdkafka's queue is full: let it drain
                        if time.monotonic() >= deadline:
                            raise BrokerTimeout(
                                f"Kafka at {self.broker.address}: the producer's queue stayed "
                                f"full for {timeout_s:g} s.", "Is the broker up and keeping "
                                "up? `scripts/kafka.sh status` checks the local one.") from None
                        producer.poll(0.01)
        return confirmation

    def publish(self, messages: list[OutMessage], timeout_s: float) -> None:
        self.send(messages, timeout_s).wait()

    def close(self) -> None:
        """Nothing to release: the producer belongs to the broker and closes with it."""


class KafkaConfirmation:
    """The delivery reports of one ``send``: ``wait`` serves the producer's reports until all
    of this send's have come (or its deadline passes); a producer that failed to deliver is
    replaced (``discard_producer``)."""

    def __init__(self, broker: KafkaBroker, producer: Any, messages: list[OutMessage],
                 timeout_s: float, deadline: float) -> None:
        self.broker, self.producer, self.messages = broker, producer, messages
        self.timeout_s, self.deadline = timeout_s, deadline
        # list.append is atomic: reports may be served by any thread that polls the producer
        self.reports: list[KafkaError | None] = []

    def delivered(self, err: KafkaError | None, _msg: Any) -> None:
        self.reports.append(err)

    def wait(self) -> None:
        expected = len(self.messages)
        while len(self.reports) < expected:
            left = self.deadline - time.monotonic()
            if left <= 0:
                break
            self.producer.poll(min(left, 1.0))  # returns as soon as a report is served
        failed = [err for err in self.reports if err is not None]
        missing = expected - len(self.reports)
        if not failed and not missing:
            return
        self.broker.discard_producer(self.producer)
        topic = self.messages[0].topic
        what = f"confirm {len(failed) + missing} of {expected} message(s) to {topic}"
        if missing or all(err.code() in _TIMEOUTS for err in failed):
            raise BrokerTimeout(f"Kafka at {self.broker.address} did not {what} within "
                                f"{self.timeout_s:g} s.", "Is the broker up, and does the topic "
                                "exist? `scripts/brokers up` starts the local one.")
        raise self.broker.error(what, KafkaException(failed[0]))


def _names(partitions: list[Any]) -> str:
    return ", ".join(f"{tp.topic}/{tp.partition}"
                     for tp in sorted(partitions, key=lambda tp: (tp.topic, tp.partition)))


class KafkaTopicConsumer:
    """A consumer-group member, or a private reader of every partition (``group`` None)."""

    def __init__(self, broker: KafkaBroker, topic: str, group: str | None, from_beginning: bool,
                 partitions: list[int], max_records: int) -> None:
        self.broker, self.topic, self.group = broker, topic, group
        self.closed = False
        self._max_records = max_records
        self._starts: dict[int, int] = {}  # partition -> committed offset, until one is read
        self._consumer: Any = None
        try:
            self._consumer = self._connect()
            if group is None:
                self._start_reader(partitions, from_beginning)
        except BaseException:
            self.close()
            raise

    def _connect(self) -> Any:
        k = self.broker.cfg.kafka
        with self.broker.translated(f"start a consumer of {self.topic}"):
            consumer = Consumer({
                **self.broker.client_config(),
                # librdkafka wants a group id even for a reader that only assigns; a reader
                # never commits or subscribes, so the broker never hears of this one.
                "group.id": self.group or f"fmnist-reader-{uuid.uuid4().hex}",
                "enable.auto.commit": False, "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest", "fetch.wait.max.ms": k.fetch_max_wait_ms,
                "session.timeout.ms": SESSION_TIMEOUT_MS, "heartbeat.interval.ms": 1000,
                "allow.auto.create.topics": False, "enable.partition.eof": False})
            if self.group is not None:
                try:
                    consumer.subscribe([self.topic], on_assign=self._assigned,
                                       on_revoke=self._revoked)
                except BaseException:
                    consumer.close()
                    raise
        return consumer

    def _assigned(self, _consumer: Any, partitions: list[Any]) -> None:
        self._starts.clear()  # see ``lag``
        log.info("group %s: partitions assigned: %s", self.group, _names(partitions) or "none")

    def _revoked(self, _consumer: Any, partitions: list[Any]) -> None:
        if partitions:
            log.info("group %s: partitions revoked: %s", self.group, _names(partitions))

    def _start_reader(self, partitions: list[int], from_beginning: bool) -> None:
        """Assign every partition at offsets resolved now, not lazily at the first fetch:
        a message published right after this returns must be seen."""
        deadline = time.monotonic() + self.broker.timeout_ms / 1000
        tps = []
        with self.broker.translated(f"find the offsets of {self.topic}"):
            for p in partitions:
                low, high = self._watermarks(TopicPartition(self.topic, p), deadline)
                tps.append(TopicPartition(self.topic, p, low if from_beginning else high))
        self._consumer.assign(tps)

    def _watermarks(self, tp: Any, deadline: float) -> tuple[int, int]:
        """A partition's first and next offsets. Retried while this client's metadata is
        behind the cluster's: a topic created a moment ago may have no leader it knows of."""
        while True:
            try:
                return self._consumer.get_watermark_offsets(
                    tp, timeout=max(0.1, deadline - time.monotonic()), cached=False)
            except KafkaException as exc:
                err = _error(exc)
                settling = err is not None and (err.retriable() or err.code() in _SETTLING)
                if not settling or time.monotonic() >= deadline:
                    raise
            time.sleep(0.05)  # start-up only, never on a request's path

    def next_batch(self, max_messages: int, timeout_s: float) -> list[Message]:
        """What has arrived (up to ``max_messages``), waiting up to ``timeout_s`` for any.

        ``consume(n, timeout)`` waits until it has all ``n`` or the timeout passes, so it is
        only ever asked for what is already fetched (timeout 0); the wait for the first
        message is a ``poll``, which returns as soon as one arrives.
        """
        limit = max(1, min(max_messages, self._max_records))
        with self.broker.translated(f"read {self.topic}"):
            records = self._consumer.consume(limit, 0)
            if not records and timeout_s > 0:
                first = self._consumer.poll(timeout_s)
                if first is not None:
                    records = [first]
                    if limit > 1:
                        records += self._consumer.consume(limit - 1, 0)
        now = time.time()
        out = []
        for r in records:
            if (err := r.error()) is not None:
                self._fetch_error(err)
                continue
            out.append(self._message(r, now))
        return out

    def _fetch_error(self, err: KafkaError) -> None:
        """An error delivered in place of a message: fatal ones end this consumer (the worker
        makes a new one); the rest librdkafka retries on its own."""
        if err.fatal() or err.code() in _NO_TOPIC:
            raise self.broker.error(f"read {self.topic}", KafkaException(err))
        log.warning("Kafka consumer of %s: %s: %s", self.topic, err.name(), err.str())

    def _message(self, r: Any, now: float) -> Message:
        headers = {name: (value or b"").decode("utf-8", "replace")
                   for name, value in r.headers() or ()}
        key, (_, stamp), partition, offset = r.key(), r.timestamp(), r.partition(), r.offset()
        epoch = r.leader_epoch()
        return Message(
            value=r.value() or b"", headers=headers,
            key=None if key is None else key.decode("utf-8", "replace"), topic=self.topic,
            source_id=f"{self.topic}/{partition}/{offset}",
            broker_time_ms=stamp if stamp >= 0 else None, received_at=now,
            handle=(partition, offset, -1 if epoch is None else epoch))

    def assigned(self) -> set[int]:
        """The partitions this consumer reads now (a group member's change with rebalances)."""
        return {tp.partition for tp in self._consumer.assignment()}

    def lag(self) -> dict[tuple[str, int], int]:
        """Messages behind the end of each assigned partition: the last known high watermark
        minus our position. librdkafka knows a position only once a message of the partition
        has been read; before that it is where the group's commit left off (asked of the
        broker once per assignment, the only round trip here) or, with no commit, the first
        retained message. Partitions whose end is not known yet are left out. Call it from
        the thread that reads."""
        assignment = self._consumer.assignment()
        if not assignment:
            return {}
        positions = self._consumer.position(assignment)
        unread = [tp for tp in positions if tp.offset < 0 and tp.partition not in self._starts]
        if unread:
            with self.broker.translated(f"read the committed offsets of group {self.group}"):
                for tp in self._consumer.committed(unread, timeout=self.broker.timeout_ms / 1000):
                    self._starts[tp.partition] = tp.offset
        lag = {}
        for tp in positions:
            low, end = self._consumer.get_watermark_offsets(tp, cached=True)
            position = tp.offset if tp.offset >= 0 else self._starts.get(tp.partition, -1)
            position = position if position >= 0 else low
            if end >= 0 and position >= 0:
                lag[(tp.topic, tp.partition)] = max(0, end - position)
        return lag

    def _owned(self, messages: list[Message]) -> dict[int, list[tuple[int, int]]]:
        """(offset, leader epoch) of the messages per partition still assigned to us; those of
        partitions a rebalance took away are logged and left to their new owner."""
        by_partition: dict[int, list[tuple[int, int]]] = {}
        for m in messages:
            partition, offset, epoch = m.handle
            by_partition.setdefault(partition, []).append((offset, epoch))
        owned = self.assigned()
        if lost := sorted(p for p in by_partition if p not in owned):
            log.warning("group %s no longer owns %s; its new owner delivers those messages "
                        "again", self.group, ", ".join(f"{self.topic}/{p}" for p in lost))
        return {p: v for p, v in by_partition.items() if p in owned}

    def commit(self, messages: list[Message]) -> None:
        """Commit, synchronously, the offset after the highest given per partition."""
        if self.group is None or not messages:
            return  # a private reader keeps no position on the broker
        offsets = []
        for partition, seen in self._owned(messages).items():
            offset, epoch = max(seen)
            offsets.append(TopicPartition(self.topic, partition, offset + 1, leader_epoch=epoch))
        if not offsets:
            return
        try:
            done = self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            if _code(exc) in _REBALANCED:
                log.warning("group %s rebalanced, commit refused (%s); the partitions' new "
                            "owner delivers those messages again", self.group, _reason(exc))
                return
            raise self.broker.error(f"commit offsets of group {self.group}", exc) from None
        refused = [tp for tp in done or () if tp.error is not None]
        if refused:
            log.warning("group %s: commit refused for %s (%s); their owner delivers those "
                        "messages again", self.group, _names(refused), refused[0].error.str())

    def redeliver(self, messages: list[Message]) -> None:
        """Seek each partition back to the lowest offset given: they are fetched again.

        A private reader does nothing: reading took nothing away from anyone.
        """
        if self.group is None or not messages:
            return
        for partition, seen in self._owned(messages).items():
            with self.broker.translated(f"seek {self.topic}/{partition}"):
                self._consumer.seek(TopicPartition(self.topic, partition, min(seen)[0]))

    def close(self) -> None:
        """Leave the group (its partitions move on at once) and close the connections."""
        if self.closed:
            return
        self.closed = True
        if self._consumer is not None:  # None: the constructor failed before connecting
            try:
                self._consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("Kafka consumer of %s did not close cleanly: %s", self.topic, exc)
