"""A Kafka consumer: a member of a consumer group that commits by hand, or a private reader of
every partition."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from fmnist.brokers.base import Message
from fmnist.brokers.kafka import errors, settings
from fmnist.errors import FmnistError

if TYPE_CHECKING:
    from fmnist.brokers.kafka.broker import KafkaBroker

log = logging.getLogger("fmnist.brokers.kafka")
# How often a group member's librdkafka reports the state of its broker connections (``outage``
# reads it); a report is ~4 KB of JSON, parsed on the reading thread.
STATS_EVERY_MS = 1000
# The longest a static member waits, on close, for librdkafka to revoke its partitions so that
# it can leave the group (``_leave``); one poll is enough when Kafka answers.
LEAVE_TIMEOUT_S = 2.0
# The longest ``commit`` holds offsets back while a rebalance that revoked some of ours is
# still under way (``_settling``): it ends in about a second, but never trust a rebalance to end.
REBALANCE_HOLD_S = settings.SESSION_TIMEOUT_MS / 1000


def _names(partitions: list[Any]) -> str:
    return ", ".join(f"{tp.topic}/{tp.partition}"
                     for tp in sorted(partitions, key=lambda tp: (tp.topic, tp.partition)))


class KafkaTopicConsumer:
    """A consumer-group member, or a private reader of every partition (``group`` None).

    A member rebalances cooperatively (docs/decisions.md#cooperative-rebalancing): a rebalance
    revokes only the partitions that move, and the member reads the others throughout.
    Work already handed out from a revoked partition is still answered, but never committed
    here (``commit`` and ``redeliver`` act only on partitions still assigned): the new owner
    starts at the last commit and answers it again, so a rebalance costs duplicates, never a
    request.
    """

    # What the rebalance callbacks gave us: for their logs, and what a commit may cover (kept
    # here, not asked of librdkafka's assignment(), a round trip to its thread, per commit)
    _held: frozenset[int] = frozenset()
    _revoked_at: float | None = None  # when a rebalance under way revoked some (``commit``)
    _assigns_to_settle = 0  # assignments until that rebalance ends (``_revoked``)
    _logged: frozenset[int] | None = None  # the assignment the last log line named
    _fenced = False  # another member took our instance id (``_fatal``)

    def __init__(self, broker: KafkaBroker, topic: str, group: str | None, from_beginning: bool,
                 partitions: list[int], max_records: int, max_hold_s: float | None = None
                 ) -> None:
        self.broker, self.topic, self.group = broker, topic, group
        self._max_hold_s = max_hold_s
        self.closed = False
        self._max_records = max_records
        self._starts: dict[int, int] = {}  # partition -> committed offset, until one is read
        self._outage: str | None = None  # see ``outage``
        self._joining = group is not None  # until the group's first assignment (``outage``)
        self._instance_id = broker.cfg.kafka.instance_id if group is not None else ""
        self._held_back: dict[int, tuple[int, int]] = {}  # partition -> (offset, epoch) to commit
        self._consumer: Any = None
        # the ACLs reading takes, named when one is missing: a member reads with its group;
        # a reader's group (settings.consumer_config) is only looked up, never joined
        self.needs: errors.Needs = {
            "Topic": ("Read", topic),
            "Group": ("Read", group) if group is not None
            else ("Describe", f"{errors.READER_GROUPS}*")}
        try:
            self._consumer = self._connect()
            if group is None:
                self._start_reader(partitions, from_beginning)
        except BaseException:
            self.close()
            raise

    def _connect(self) -> Any:
        k = self.broker.cfg.kafka
        conf = {**self.broker.client_config(),
                **settings.consumer_config(k, self.group, self._max_hold_s)}
        if self.group is not None:  # a worker: it watches its connections (``outage``)
            conf.update({"error_cb": self._client_error, "stats_cb": self._connections,
                         "statistics.interval.ms": STATS_EVERY_MS})
        with self.broker.translated(f"start a consumer of {self.topic}", self.needs):
            consumer = Consumer(conf)
            if self.group is not None:
                try:
                    consumer.subscribe([self.topic], on_assign=self._assigned,
                                       on_revoke=self._revoked, on_lost=self._lost)
                except BaseException:
                    consumer.close()
                    raise
        return consumer

    def outage(self) -> str | None:
        """Why this group member cannot reach Kafka now, or None.

        Set by librdkafka's reports, served on the reading thread by ``next_batch``: a client
        error that every broker is down or a connection failed, or a fetch that failed for the
        same reasons; cleared by its next statistics (every ``STATS_EVERY_MS``) that show a
        broker connection up. librdkafka reconnects by itself, so nothing else would tell a
        waiting consumer that Kafka went away, or came back. Before that, until the group has
        assigned it its partitions (none, where the group has more members than partitions):
        a request sent earlier waits for the join, about a second.
        """
        if self._joining and self._outage is None:
            return f"joining consumer group {self.group}"
        return self._outage

    def _client_error(self, err: KafkaError) -> None:
        errors.client_error(err)
        if err.code() in errors.UNREACHABLE:
            self._outage = f"Kafka at {self.broker.address}: {err.str()}"

    def _connections(self, report: str) -> None:
        try:
            brokers = json.loads(report).get("brokers", {}).values()
        except ValueError:  # librdkafka writes valid JSON; never let a report stop the reading
            return
        known = [b for b in brokers if b.get("source") != "internal"]
        if any(b.get("state") == "UP" for b in known):
            self._outage = None
        elif known and self._outage is None:
            self._outage = f"Kafka at {self.broker.address}: no broker connection is up"

    # -- rebalances: librdkafka calls these from inside poll/consume/close, on the reading thread

    def _assigned(self, consumer: Any, partitions: list[Any]) -> None:
        """Partitions added to ours (cooperative: ``partitions`` is only what is new, often
        nothing). Each starts at the group's last commit for it."""
        self._change(consumer, "incremental_assign", partitions)
        self._held = self._held | {tp.partition for tp in partitions}
        if self._held != self._logged or self._joining:  # the line names all we hold now
            log.info("group %s: partitions assigned: %s", self.group, self._holding())
            self._logged = self._held
        self._joining = False
        if self._assigns_to_settle:
            self._assigns_to_settle -= 1
            if not self._assigns_to_settle:  # the rebalance that revoked some of ours is over
                self._revoked_at = None
                if self._held_back and consumer is not None and not self.closed:
                    self._commit_held_back(quietly=True)

    def _revoked(self, consumer: Any, partitions: list[Any]) -> None:
        """Partitions taken away to go to another member; the rest stay ours and are read on.
        Work from them still in the pipeline is answered, never committed (see the class)."""
        self._change(consumer, "incremental_unassign", partitions)
        self._held = self._held - {tp.partition for tp in partitions}
        if partitions:
            # librdkafka then assigns what the first round added (often nothing) and rejoins;
            # the rebalance ends with the second round's assignment.
            self._revoked_at, self._assigns_to_settle = time.monotonic(), 2
            log.info("group %s: partitions revoked: %s (kept %s)", self.group,
                     _names(partitions), self._holding())

    def _lost(self, consumer: Any, partitions: list[Any]) -> None:
        """Partitions the group gave away without asking us: this member missed its session
        (``SESSION_TIMEOUT_MS``) or held a batch past ``max.poll.interval.ms``. Another member
        may already read them, so nothing of theirs is committed."""
        self._change(consumer, "incremental_unassign", partitions)
        self._held = self._held - {tp.partition for tp in partitions}
        if partitions:
            log.warning("group %s: partitions lost: %s; their new owner answers again what "
                        "was not committed", self.group, _names(partitions))

    def _change(self, consumer: Any, how: str, partitions: list[Any]) -> None:
        """librdkafka's incremental (un)assignment, which a callback under the cooperative
        protocol must make itself. What another member may have committed for these
        partitions is asked again (see ``lag``). While closing, a refusal is of no
        consequence (the handle goes away with its assignment) and must not fail the close."""
        for tp in partitions:
            self._starts.pop(tp.partition, None)
            if how == "incremental_unassign":
                self._held_back.pop(tp.partition, None)  # no longer ours to commit
        if consumer is None:  # the unit tests' member has no librdkafka handle
            return
        try:
            getattr(consumer, how)(partitions)
        except KafkaException as exc:
            if not self.closed:
                raise
            log.debug("group %s: %s while closing: %s", self.group, how, exc)

    def _holding(self) -> str:
        return ", ".join(f"{self.topic}/{p}" for p in sorted(self._held)) or "none"

    def _start_reader(self, partitions: list[int], from_beginning: bool) -> None:
        """Assign every partition at offsets resolved now, not lazily at the first fetch:
        a message published right after this returns must be seen."""
        deadline = time.monotonic() + self.broker.timeout_ms / 1000
        tps = []
        with self.broker.translated(f"find the offsets of {self.topic}", self.needs):
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
                err = errors.error_of(exc)
                settling = err is not None and (err.retriable() or err.code() in errors.SETTLING)
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
        with self._translated(f"read {self.topic}"):
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
        makes a new one, unless it was fenced: ``_fatal``); the rest librdkafka retries on its
        own."""
        if err.code() == KafkaError._FATAL:
            raise self._fatal(err, f"read {self.topic}")
        if err.fatal() or err.code() in errors.NO_TOPIC or err.code() in errors.UNAUTHORIZED:
            raise self.broker.error(f"read {self.topic}", KafkaException(err), self.needs)
        if err.code() in errors.UNREACHABLE | errors.TIMEOUTS:
            self._outage = f"Kafka at {self.broker.address}: reading {self.topic}: {err.str()}"
        log.warning("Kafka consumer of %s: %s: %s", self.topic, err.name(), err.str())

    def _fatal(self, err: KafkaError, what: str) -> FmnistError:
        """librdkafka's fatal error leaves a consumer unusable. The one a static member meets
        is being fenced out by another consumer that joined with the same
        ``group.instance.id``: a configuration error, not an outage (librdkafka's own words are
        kept in the message). Reconnecting would fence the other in turn, and the two would
        take the partitions from each other forever, so the worker stops (exit code 2)."""
        if not self._instance_id:
            return self.broker.error(what, KafkaException(err), self.needs)
        self._fenced = True  # so ``close`` does not try to leave in the other's name
        return errors.fenced(self.group, self._instance_id, err)

    @contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        """``broker.translated``, with a fatal error worded by ``_fatal``."""
        try:
            yield
        except KafkaException as exc:
            err = errors.error_of(exc)
            if err is not None and err.code() == KafkaError._FATAL:
                raise self._fatal(err, what) from None
            raise self.broker.error(what, exc, self.needs) from None

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
            with self._translated(f"read the committed offsets of group {self.group}"):
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
        owned = self._held
        if lost := sorted(p for p in by_partition if p not in owned):
            log.warning("group %s no longer owns %s; its new owner delivers those messages "
                        "again", self.group, ", ".join(f"{self.topic}/{p}" for p in lost))
        return {p: v for p, v in by_partition.items() if p in owned}

    def commit(self, messages: list[Message]) -> None:
        """Commit, synchronously, the offset after the highest given per partition.

        Not while a rebalance that revoked some of our partitions is under way: from the
        revocation to the end of the rebalance's second round (about a second) librdkafka
        holds a commit, then fails it (ILLEGAL_GENERATION), and the serve loop would wait in
        it, answering none of the partitions it kept (measured: 0.9 s). The offsets are held
        back meanwhile and committed when the rebalance ends (``_assigned``) or at close; a
        worker killed before that answers them again, as for any commit not yet made.
        """
        if self.group is None or not messages:
            return  # a private reader keeps no position on the broker
        for partition, seen in self._owned(messages).items():
            offset, epoch = max(seen)
            if offset + 1 > self._held_back.get(partition, (-1, -1))[0]:
                self._held_back[partition] = (offset + 1, epoch)
        if not self._settling():
            self._commit_held_back()

    def _settling(self) -> bool:
        """A rebalance that revoked some of ours has not ended yet (``REBALANCE_HOLD_S`` at
        most)."""
        return (self._assigns_to_settle > 0 and self._revoked_at is not None
                and time.monotonic() - self._revoked_at < REBALANCE_HOLD_S)

    def _commit_held_back(self, quietly: bool = False) -> None:
        """Commit the offsets ``commit`` collected, of the partitions still ours. ``quietly``
        (from a rebalance callback, or closing): a failure is logged, not raised; the
        partitions' next owner answers those requests again."""
        owned = self._held
        offsets = [TopicPartition(self.topic, p, offset, leader_epoch=epoch)
                   for p, (offset, epoch) in sorted(self._held_back.items()) if p in owned]
        self._held_back = {}
        if not offsets:
            return
        try:
            with self._translated(f"commit offsets of group {self.group}"):
                try:
                    done = self._consumer.commit(offsets=offsets, asynchronous=False)
                except KafkaException as exc:
                    if errors.code_of(exc) not in errors.REBALANCED:
                        raise
                    log.warning("group %s rebalanced, commit refused (%s); the partitions' "
                                "new owner delivers those messages again", self.group,
                                errors.reason_of(exc))
                    return
        except FmnistError as exc:
            if not quietly:
                raise
            log.warning("group %s: commit failed (%s); those requests are answered again",
                        self.group, exc.message)
            return
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
            with self._translated(f"seek {self.topic}/{partition}"):
                self._consumer.seek(TopicPartition(self.topic, partition, min(seen)[0]))

    def close(self) -> None:
        """Leave the group (its partitions move on at once) and close the connections."""
        if self.closed:
            return
        self.closed = True
        if self._consumer is not None:  # None: the constructor failed before connecting
            try:
                if self._held_back:  # held back by a rebalance that has not ended (``commit``)
                    self._commit_held_back(quietly=True)
                if self._instance_id and not self._fenced:
                    self._leave()
                self._consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("Kafka consumer of %s did not close cleanly: %s", self.topic, exc)

    def _leave(self) -> None:
        """Leave the group as a static member, which librdkafka's close alone never does.

        A static member that closes keeps its partitions for its session
        (``SESSION_TIMEOUT_MS``), waiting for a process with its id; nobody reads them
        meanwhile. A worker that closes drains (SIGTERM) or reconnects, and a replacement
        takes seconds to start (the model loads), far longer than a rebalance, so it leaves,
        as a dynamic member does: its partitions move on at once
        (docs/decisions.md#cooperative-rebalancing). librdkafka sends the LeaveGroup once the
        revocation that ``unsubscribe`` starts is served, which takes a poll; a message that
        poll fetches is dropped uncommitted, and its next owner reads it.
        """
        self._consumer.unsubscribe()
        deadline = time.monotonic() + LEAVE_TIMEOUT_S
        while self._consumer.assignment() and time.monotonic() < deadline:
            self._consumer.poll(0.05)
