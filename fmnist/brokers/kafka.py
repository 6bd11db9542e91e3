"""Apache Kafka behind the Broker interface, with kafka-python.

The only module that imports ``kafka``. How the interface maps onto Kafka:

* a consumer *group* is a Kafka consumer group: workers sharing ``kafka.group_id`` split the
  topic's partitions; offsets are committed by hand (``commit``), never automatically, so a
  request is acknowledged only after its answer is confirmed; a new group starts at the
  earliest retained message;
* ``redeliver`` seeks each partition back to the lowest offset given, so those messages (and
  any after them) are fetched again; Kafka has no per-message acknowledgement;
* a *private reader* (no group) assigns itself every partition of the topic and starts at the
  end (or the beginning), with no group and no commits: reading leaves nothing behind;
* topics we create use ``message.timestamp.type=LogAppendTime``, so a message's timestamp is
  when the broker stored it (``Message.broker_time_ms``).

Every call is bounded: bootstrapping by ``broker.connect_timeout_s`` (``check`` by its own
timeout), requests by the same, ``send`` by ``max_block_ms``; a rebalance never crashes a
worker: a commit the group no longer accepts is logged and dropped (the partition's new owner
delivers those messages again: at-least-once).

kafka-python 3.0.12 quirks handled here: ``flush()`` does not raise for failed sends (we wait
on every future); its import warns (DeprecationWarning, silenced); a failed connect leaks its
socket (``check`` probes with a plain TCP connect first); a group member can wedge in a
rebalance (``KafkaTopicConsumer._heal``); the idempotent producer can wedge when the broker
restarts (``KafkaBroker.discard_producer``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fmnist.brokers.base import Message, OutMessage
from fmnist.config import Config
from fmnist.errors import BrokerError, BrokerTimeout, ConfigError, FmnistError

with warnings.catch_warnings():
    # kafka-python 3.0 loads its protocol schemas with the deprecated
    # importlib.resources.read_text at import time; nothing we can fix, and it must not turn
    # into an error under `-W error` (pytest's filterwarnings = error).
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import (
        ConsumerRebalanceListener,
        KafkaAdminClient,
        KafkaConsumer,
        KafkaProducer,
        OffsetAndMetadata,
        TopicPartition,
    )
    from kafka import errors as kerr
    from kafka.admin import OffsetSpec
    from kafka.structs import MemberState

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0
SESSION_TIMEOUT_MS = 10_000  # a dead worker's partitions move on after this long
STUCK_S = 3 * SESSION_TIMEOUT_MS / 1000  # see KafkaTopicConsumer._heal
COMPRESSIONS = ("", "gzip")  # what kafka-python does without extra packages
# A rebalance took the partitions away: the commit is refused, the new owner re-delivers.
_REBALANCED = (kerr.CommitFailedError, kerr.RebalanceInProgressError,
               kerr.IllegalGenerationError, kerr.UnknownMemberIdError,
               kerr.FencedInstanceIdError)
_ALREADY_EXISTS = kerr.TopicAlreadyExistsError.errno


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

    def client_config(self, timeout_ms: int | None = None) -> dict[str, Any]:
        """Connection settings shared by admin, producer and consumers (from ``kafka.*``)."""
        k = self.cfg.kafka
        timeout_ms = timeout_ms or self.timeout_ms
        conf: dict[str, Any] = {
            "bootstrap_servers": [s.strip() for s in k.bootstrap_servers.split(",") if s.strip()],
            "client_id": k.client_id, "security_protocol": k.security_protocol,
            "bootstrap_timeout_ms": timeout_ms, "request_timeout_ms": self.timeout_ms,
            "reconnect_backoff_max_ms": 2000,
        }
        if k.sasl_mechanism:
            conf.update(sasl_mechanism=k.sasl_mechanism, sasl_plain_username=k.sasl_username,
                        sasl_plain_password=k.sasl_password)
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if value := getattr(k, key):
                conf[key] = value
        return conf

    def error(self, what: str, exc: BaseException) -> BrokerError:
        """A kafka-python exception as a BrokerError that says what to do next."""
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, kerr.KafkaTimeoutError) and "bootstrap" in reason.lower():
            return self.unreachable(f"{what}: {reason}")
        if isinstance(exc, (kerr.AuthorizationError, kerr.SaslAuthenticationFailedError)):
            return BrokerError(f"Kafka at {self.address} refused to {what}: {reason}",
                               "Check `kafka.security_protocol`, `kafka.sasl_*` and `kafka.ssl_*` "
                               "(FMNIST_KAFKA__SASL_USERNAME, ...) and the ACLs of that user.")
        if isinstance(exc, kerr.KafkaTimeoutError):
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
        except kerr.KafkaError as exc:
            raise self.error(what, exc) from None

    def admin(self, timeout_ms: int | None = None) -> Any:
        """The one KafkaAdminClient (topics, metadata), created on first use."""
        with self._lock:
            if self._admin is None:
                with self.translated("connect"):
                    self._admin = KafkaAdminClient(**self.client_config(timeout_ms))
            return self._admin

    def shared_producer(self) -> Any:
        """The one KafkaProducer (thread-safe), idempotent with acks=all."""
        k = self.cfg.kafka
        with self._lock:
            if self._producer is None:
                with self.translated("connect a producer"):
                    producer = KafkaProducer(
                        **self.client_config(), acks="all", linger_ms=k.linger_ms,
                        compression_type=k.compression or None, max_block_ms=self.timeout_ms,
                        delivery_timeout_ms=max(30_000, k.linger_ms + 2 * self.timeout_ms),
                        allow_auto_create_topics=False)
                if not producer.config["enable_idempotence"]:  # kafka-python turns it off quietly
                    log.warning("Kafka producer is not idempotent: retries may duplicate messages")
                self._producer = producer
            return self._producer

    def discard_producer(self, producer: Any) -> None:
        """Forget a producer whose sends were not confirmed; the next publish makes a new one.

        kafka-python 3.0.12's idempotent producer can wedge for good when the broker restarts
        under it: it drops its producer id with batches queued for retry and never sends them
        again (every later publish times out). What the old producer still holds is abandoned;
        its publish has failed, so the caller sends it again (the worker redelivers the batch).
        """
        with self._lock:
            if self._producer is producer:
                self._producer = None
        try:
            producer.close(timeout=0)
        except kerr.KafkaError:  # close() flushes first, which a wedged producer cannot do:
            producer._sender.force_close()  # fail what it holds, stop its I/O thread

    def partitions(self, topic: str) -> list[int]:
        """The partition ids of ``topic``; BrokerError when it does not exist."""
        with self.translated(f"describe topic {topic}"):
            (found,) = self.admin().describe_topics([topic])
        if found.get("error_code", 0) or not found.get("partitions"):
            raise BrokerError(f"Kafka topic {topic} does not exist at {self.address}.",
                              "Create it first (`broker.create_topics: true` does that on start).")
        return sorted(p["partition_index"] for p in found["partitions"])

    def group_lag(self, group: str, topic: str) -> dict[int, int]:
        """Per partition of ``topic``, how many messages ``group`` has not committed: the end
        offset minus the committed one (from the first retained message where the group has
        no commit). Asked of the broker, so it covers every member of the group."""
        tps = [TopicPartition(topic, p) for p in self.partitions(topic)]
        admin = self.admin()
        with self.translated(f"read the offsets of group {group} on {topic}"):
            committed = admin.list_group_offsets({group: tps}).get(group, {})
            ends = admin.list_partition_offsets({tp: OffsetSpec.LATEST for tp in tps})
            starts = admin.list_partition_offsets({tp: OffsetSpec.EARLIEST for tp in tps})
        lag = {}
        for tp in tps:
            done = committed.get(tp)
            position = done.offset if done is not None and done.offset >= 0 else starts[tp].offset
            lag[tp.partition] = max(0, ends[tp].offset - position)
        return lag

    # -- the Broker interface ----------------------------------------------------------------

    def check(self, timeout_s: float) -> None:
        """Bounded by ``timeout_s``: a plain TCP connect to the bootstrap servers first (fails at
        once, without kafka-python's retries and log noise, when nothing listens), then a
        Kafka bootstrap and one topic listing."""
        deadline = time.monotonic() + timeout_s
        self._probe(deadline)
        left_ms = int((deadline - time.monotonic()) * 1000)
        admin = self.admin(timeout_ms=max(100, left_ms))
        with self.translated("list topics"):
            admin.list_topics()

    def _probe(self, deadline: float) -> None:
        failures = []
        for server in self.client_config()["bootstrap_servers"]:
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
        admin, k = self.admin(), self.cfg.kafka
        with self.translated("list topics"):
            existing = set(admin.list_topics())
        missing = [t for t in dict.fromkeys(topics) if t not in existing]
        if not missing:
            return
        spec = {"num_partitions": k.partitions, "replication_factor": k.replication_factor,
                "configs": {"message.timestamp.type": "LogAppendTime"}}
        with self.translated(f"create topics {', '.join(missing)}"):
            result = admin.create_topics({t: spec for t in missing}, timeout_ms=self.timeout_ms,
                                         raise_errors=False)
        for topic in result["topics"]:
            code = topic.get("error_code", 0)
            if code and code != _ALREADY_EXISTS:
                detail = topic.get("error_message") or kerr.for_code(code).__name__
                raise BrokerError(f"Kafka at {self.address} could not create topic "
                                  f"{topic['name']}: {detail}",
                                  "Check the name ([a-zA-Z0-9._-], at most 249 characters), "
                                  "`kafka.partitions` and `kafka.replication_factor`.")
            if not code:
                log.info("created Kafka topic %s (%d partitions)", topic["name"], k.partitions)
        with self.translated(f"wait for topics {', '.join(missing)}"):
            admin.wait_for_topics(missing, timeout_ms=self.timeout_ms)

    def consumer(self, topic: str, group: str | None = None, from_beginning: bool = False,
                 max_in_flight: int = 1000) -> KafkaTopicConsumer:
        """A group member of ``group``, or a private reader of all partitions (``group`` None).

        ``max_in_flight`` caps how many records one poll hands out; Kafka has no per-message
        lease to bound beyond that. ``from_beginning`` only matters for a private reader (a new
        group always starts at the earliest message).
        """
        partitions = self.partitions(topic)
        consumer = KafkaTopicConsumer(self, topic, group, from_beginning, partitions,
                                      max(1, min(max_in_flight, 500)))
        with self._lock:
            self._consumers = [c for c in self._consumers if not c.closed] + [consumer]
        return consumer

    def producer(self) -> KafkaTopicProducer:
        return KafkaTopicProducer(self)

    def close(self) -> None:
        """Close every consumer made here, then the shared producer and admin client."""
        with self._lock:
            consumers, self._consumers = self._consumers, []
            producer, self._producer = self._producer, None
            admin, self._admin = self._admin, None
        for consumer in consumers:
            consumer.close()
        if producer is not None:
            try:
                producer.close(timeout=CLOSE_TIMEOUT_S)  # sends what is still lingering
            except kerr.KafkaError as exc:
                log.warning("Kafka producer did not close cleanly: %s", exc)
        if admin is not None:
            admin.close()


class KafkaTopicProducer:
    """Publishes through the broker's shared producer."""

    def __init__(self, broker: KafkaBroker) -> None:
        self.broker = broker

    def send(self, messages: list[OutMessage], timeout_s: float) -> KafkaConfirmation:
        """Queue all in the producer (its I/O thread sends them); ``wait`` checks each one."""
        producer = self.broker.shared_producer()
        deadline = time.monotonic() + timeout_s
        sent = []
        for m in messages:
            with self.broker.translated(f"send to {m.topic} (does the topic exist?)"):
                sent.append((m, producer.send(
                    m.topic, value=m.value, key=None if m.key is None else m.key.encode(),
                    headers=[(name, value.encode()) for name, value in m.headers.items()])))
        return KafkaConfirmation(self.broker, producer, sent, timeout_s, deadline)

    def publish(self, messages: list[OutMessage], timeout_s: float) -> None:
        self.send(messages, timeout_s).wait()

    def close(self) -> None:
        """Nothing to release: the producer belongs to the broker and closes with it."""


class KafkaConfirmation:
    """The futures of one ``send``: ``wait`` checks every one (``flush`` would not raise for a
    failed send) and discards a producer that failed to deliver (``discard_producer``)."""

    def __init__(self, broker: KafkaBroker, producer: Any, sent: list[tuple[OutMessage, Any]],
                 timeout_s: float, deadline: float) -> None:
        self.broker, self.producer, self.sent = broker, producer, sent
        self.timeout_s, self.deadline = timeout_s, deadline

    def wait(self) -> None:
        failed: list[tuple[OutMessage, BaseException]] = []
        for m, future in self.sent:
            try:
                future.get(timeout=max(0.0, self.deadline - time.monotonic()))
            except kerr.KafkaError as exc:
                failed.append((m, exc))
        if not failed:
            return
        self.broker.discard_producer(self.producer)
        m, first_error = failed[0]
        what = f"confirm {len(failed)} of {len(self.sent)} message(s) to {m.topic}"
        if isinstance(first_error, kerr.KafkaTimeoutError):
            raise BrokerTimeout(f"Kafka at {self.broker.address} did not {what} within "
                                f"{self.timeout_s:g} s.", "Is the broker up? "
                                "`scripts/brokers up` starts the local one.")
        raise self.broker.error(what, first_error)


class _Rebalances(ConsumerRebalanceListener):
    def __init__(self, group: str) -> None:
        self.group = group

    def on_partitions_revoked(self, revoked: Any) -> None:
        if revoked:
            log.info("group %s: partitions revoked: %s", self.group, _names(revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("group %s: partitions assigned: %s", self.group, _names(assigned) or "none")


def _names(partitions: Any) -> str:
    return ", ".join(f"{tp.topic}/{tp.partition}" for tp in sorted(partitions))


class KafkaTopicConsumer:
    """A consumer-group member, or a private reader of every partition (``group`` None)."""

    def __init__(self, broker: KafkaBroker, topic: str, group: str | None, from_beginning: bool,
                 partitions: list[int], max_records: int) -> None:
        self.broker, self.topic, self.group = broker, topic, group
        self.closed = False
        self._max_records = max_records
        self._unstable_since: float | None = None
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
            consumer = KafkaConsumer(
                **self.broker.client_config(), group_id=self.group, enable_auto_commit=False,
                auto_offset_reset="earliest", fetch_max_wait_ms=k.fetch_max_wait_ms,
                max_poll_records=self._max_records, session_timeout_ms=SESSION_TIMEOUT_MS,
                heartbeat_interval_ms=1000, allow_auto_create_topics=False)
            if self.group is None:
                return consumer
            try:
                consumer.subscribe([self.topic], listener=_Rebalances(self.group))
                # Have the topic's partitions in the client's metadata before the first join:
                # a leader that joins without them assigns nothing and rejoins when they
                # arrive, the rejoin that can wedge (see ``_heal``). Bounded by the request
                # timeout.
                consumer.partitions_for_topic(self.topic)
            except BaseException:
                consumer.close(autocommit=False, timeout_ms=int(CLOSE_TIMEOUT_S * 1000))
                raise
        return consumer

    def _heal(self) -> None:
        """Start over with a fresh client when this member has been seen outside a stable group
        for ``STUCK_S``.

        kafka-python 3.0.12 can wedge a member for good: when a rejoin is triggered by a
        metadata change (not by the coordinator) and ``poll`` gives up before the JoinGroup /
        SyncGroup round trip ends, nothing ever applies its result: heartbeats stay off, no
        partitions, forever. The group gives our partitions to others after the session
        timeout; a fresh consumer rejoins and resumes from the committed offsets.
        """
        now = time.monotonic()
        if self.group is None or self._consumer.group_metadata().state == MemberState.STABLE:
            self._unstable_since = None
            return
        if self._unstable_since is None:  # first seen now (not since our last call: a long
            self._unstable_since = now    # batch between two calls must not count)
        if now - self._unstable_since < STUCK_S:
            return
        log.warning("group %s: no stable membership for %.0f s; reconnecting the consumer of %s",
                    self.group, now - self._unstable_since, self.topic)
        fresh = self._connect()  # raises BrokerError, leaving the old one for the next try
        old, self._consumer, self._unstable_since = self._consumer, fresh, None
        _close_quietly(old, self.topic)

    def _start_reader(self, partitions: list[int], from_beginning: bool) -> None:
        """Assign every partition and seek to resolved offsets now, not lazily at first poll:
        a message published right after this returns must be seen."""
        tps = [TopicPartition(self.topic, p) for p in partitions]
        self._consumer.assign(tps)
        with self.broker.translated(f"find the offsets of {self.topic}"):
            lookup = self._consumer.beginning_offsets if from_beginning else \
                self._consumer.end_offsets
            offsets = lookup(tps, timeout_ms=self.broker.timeout_ms)
        for tp, offset in offsets.items():
            self._consumer.seek(tp, offset)

    def next_batch(self, max_messages: int, timeout_s: float) -> list[Message]:
        """What has arrived (up to ``max_messages``), waiting up to ``timeout_s`` for any."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        records: list[Any] = []
        with self.broker.translated(f"read {self.topic}"):
            self._heal()
            while len(records) < max_messages:
                wait_ms = 0 if records else int(max(0.0, deadline - time.monotonic()) * 1000)
                polled = self._consumer.poll(timeout_ms=wait_ms,
                                             max_records=max_messages - len(records))
                got = [r for batch in polled.values() for r in batch]
                records.extend(got)
                if not got and (records or time.monotonic() >= deadline):
                    break
        now = time.time()
        return [self._message(r, now) for r in records]

    def _message(self, r: Any, now: float) -> Message:
        headers = {name: (value or b"").decode("utf-8", "replace") for name, value in r.headers}
        return Message(
            value=r.value if r.value is not None else b"", headers=headers,
            key=None if r.key is None else r.key.decode("utf-8", "replace"), topic=r.topic,
            source_id=f"{r.topic}/{r.partition}/{r.offset}",
            broker_time_ms=r.timestamp if r.timestamp is not None and r.timestamp >= 0 else None,
            received_at=now, handle=(TopicPartition(r.topic, r.partition), r.offset,
                                     -1 if r.leader_epoch is None else r.leader_epoch))

    def assigned(self) -> set[int]:
        """The partitions this consumer reads now (a group member's changes with rebalances)."""
        return {tp.partition for tp in self._consumer.assignment()}

    def lag(self) -> dict[tuple[str, int], int]:
        """Messages behind the end of each assigned partition: the last known high watermark
        minus our position. No broker round trip; partitions whose end is not known yet are
        left out. Call it from the thread that polls (kafka-python is not thread-safe)."""
        lag = {}
        for tp in self._consumer.assignment():
            end = self._consumer.highwater(tp)
            position = self._consumer.position(tp, timeout_ms=0)
            if end is not None and position is not None:
                lag[(tp.topic, tp.partition)] = max(0, end - position)
        return lag

    def _owned(self, messages: list[Message]) -> dict[Any, list[tuple[int, int]]]:
        """(offset, leader epoch) of the messages per partition still assigned to us; those of
        partitions a rebalance took away are logged and left to their new owner."""
        by_tp: dict[Any, list[tuple[int, int]]] = {}
        for m in messages:
            tp, offset, epoch = m.handle
            by_tp.setdefault(tp, []).append((offset, epoch))
        owned = self._consumer.assignment()
        if lost := [tp for tp in by_tp if tp not in owned]:
            log.warning("group %s no longer owns %s; its new owner delivers those messages "
                        "again", self.group, _names(lost))
        return {tp: v for tp, v in by_tp.items() if tp in owned}

    def commit(self, messages: list[Message]) -> None:
        """Commit, synchronously, the offset after the highest given per partition."""
        if self.group is None or not messages:
            return  # a private reader keeps no position on the broker
        offsets = {}
        for tp, seen in self._owned(messages).items():
            offset, epoch = max(seen)
            offsets[tp] = OffsetAndMetadata(offset + 1, "", epoch)
        if not offsets:
            return
        try:
            self._consumer.commit(offsets, timeout_ms=self.broker.timeout_ms)
        except _REBALANCED as exc:
            log.warning("group %s rebalanced, commit refused (%s); the partitions' new owner "
                        "delivers those messages again", self.group, type(exc).__name__)
        except kerr.KafkaError as exc:
            raise self.broker.error(f"commit offsets of group {self.group}", exc) from None

    def redeliver(self, messages: list[Message]) -> None:
        """Seek each partition back to the lowest offset given: they are fetched again.

        A private reader does nothing: reading took nothing away from anyone.
        """
        if self.group is None or not messages:
            return
        for tp, seen in self._owned(messages).items():
            self._consumer.seek(tp, min(seen)[0])

    def close(self) -> None:
        """Leave the group (its partitions move on at once) and close the connections."""
        if self.closed:
            return
        self.closed = True
        if self._consumer is not None:  # None: the constructor failed before connecting
            _close_quietly(self._consumer, self.topic)


def _close_quietly(consumer: Any, topic: str) -> None:
    try:
        consumer.close(autocommit=False, timeout_ms=int(CLOSE_TIMEOUT_S * 1000))
    except kerr.KafkaError as exc:
        log.warning("Kafka consumer of %s did not close cleanly: %s", topic, exc)
