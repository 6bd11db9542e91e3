"""A Kafka group member's side of a rebalance: incremental assignment (cooperative-sticky) and a
static member fenced by another with its id. No broker: the member is made against a port
nothing listens on (librdkafka connects only later), and librdkafka's handle is replaced by a
recorder where a test plays the group's part."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from fmnist import config
from fmnist.brokers.base import Message
from fmnist.brokers.kafka import KafkaBroker, KafkaTopicConsumer
from fmnist.errors import BrokerError, ConfigError


class Handle:
    """Records the (un)assignments a rebalance callback makes; refuses them when told to."""

    def __init__(self, refuse: bool = False) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.refuse = refuse

    def _record(self, how: str, partitions: list[Any]) -> None:
        if self.refuse:
            raise KafkaException(KafkaError(KafkaError._DESTROY, "handle destroyed"))
        self.calls.append((how, [tp.partition for tp in partitions]))

    def incremental_assign(self, partitions: list[Any]) -> None:
        self._record("assign", partitions)

    def incremental_unassign(self, partitions: list[Any]) -> None:
        self._record("unassign", partitions)


def tps(*partitions: int) -> list[TopicPartition]:
    return [TopicPartition("req", p) for p in partitions]


@pytest.fixture
def member_of(fmnist_home: Path) -> Iterator[Any]:
    made: list[KafkaTopicConsumer] = []

    def make(instance_id: str = "") -> KafkaTopicConsumer:
        env = {"FMNIST_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",
               "FMNIST_KAFKA__INSTANCE_ID": instance_id}
        b = KafkaBroker(config.load(env=env, use_default_file=False))
        made.append(KafkaTopicConsumer(b, "req", "workers", False, [0, 1, 2, 3], 100))
        return made[-1]

    yield make
    for member in made:
        member.close()


def test_a_rebalance_changes_only_the_partitions_it_names(member_of: Any) -> None:
    member, handle = member_of(), Handle()
    member._starts = {0: 5, 1: 7, 2: 9}  # committed offsets known before (see ``lag``)
    member._assigned(handle, tps(0, 1, 2, 3))
    member._revoked(handle, tps(2, 3))  # a newcomer takes two; 0 and 1 are read on
    member._assigned(handle, [])  # the second round of a cooperative rebalance: nothing new
    member._lost(handle, tps(1))
    assert handle.calls == [("assign", [0, 1, 2, 3]), ("unassign", [2, 3]), ("assign", []),
                            ("unassign", [1])]
    assert member._held == {0}
    # every partition that moved is asked for its commit again, once ours again
    assert member._starts == {}


def test_the_first_assignment_ends_joining_even_when_it_is_empty(member_of: Any) -> None:
    member = member_of()
    assert member.outage() == "joining consumer group workers"
    member._assigned(Handle(), [])  # a newcomer's first round, or more members than partitions
    assert member.outage() is None


def test_a_refused_unassignment_fails_the_read_but_never_the_close(member_of: Any) -> None:
    member = member_of()
    with pytest.raises(KafkaException):
        member._revoked(Handle(refuse=True), tps(0))  # from poll: the worker reconnects
    member.closed = True
    member._revoked(Handle(refuse=True), tps(0))  # from close: the handle is going anyway


class Group(Handle):
    """A handle whose assignment follows the callbacks, and which records commits."""

    def __init__(self, real: Any) -> None:
        super().__init__()
        self.real, self.owned, self.commits = real, set[int](), list[dict[int, int]]()

    def incremental_assign(self, partitions: list[Any]) -> None:
        self.owned |= {tp.partition for tp in partitions}

    def incremental_unassign(self, partitions: list[Any]) -> None:
        self.owned -= {tp.partition for tp in partitions}

    def assignment(self) -> list[TopicPartition]:
        return tps(*sorted(self.owned))

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> list[Any]:
        assert not asynchronous
        self.commits.append({tp.partition: tp.offset for tp in offsets})
        return offsets

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def answered(partition: int, offset: int) -> Message:
    return Message(b"", {}, None, "req", f"req/{partition}/{offset}", None, 0.0,
                   handle=(partition, offset, 1))


def test_commits_wait_for_the_rebalance_that_revoked_some_of_ours(member_of: Any) -> None:
    member = member_of()
    real = member._consumer
    member._consumer = group = Group(real)
    try:
        member._assigned(group, tps(0, 1, 2, 3))
        member.commit([answered(0, 9), answered(2, 4)])
        assert group.commits == [{0: 10, 2: 5}]  # no rebalance: at once
        member._revoked(group, tps(0, 1))  # a newcomer takes two
        member.commit([answered(2, 7), answered(3, 1), answered(0, 12)])  # 0: no longer ours
        member._assigned(group, [])  # the first round's (empty) assignment, then a rejoin
        member.commit([answered(2, 8)])
        assert group.commits == [{0: 10, 2: 5}]  # held back: librdkafka would hold them
        member._assigned(group, [])  # the second round: the rebalance is over
        assert group.commits[1:] == [{2: 9, 3: 2}]  # the highest of each, in one commit
        member.commit([answered(3, 5)])
        assert group.commits[2:] == [{3: 6}]
    finally:
        member._consumer = real


def test_a_revoked_partition_s_held_back_offsets_are_never_committed(member_of: Any) -> None:
    member = member_of()
    real = member._consumer
    member._consumer = group = Group(real)
    try:
        member._assigned(group, tps(0, 1))
        member._revoked(group, tps(1))
        member.commit([answered(0, 3)])
        member._assigned(group, [])
        member._revoked(group, tps(0))  # another rebalance takes it before this one ends
        member._assigned(group, [])
        member._assigned(group, tps(2))
        assert group.commits == []  # partition 0's new owner answers offset 3 again
    finally:
        member._consumer = real


FENCED = KafkaError(KafkaError._FATAL, "Fatal error: Broker: Static consumer fenced by other "
                                       "consumer with same group.instance.id")


def test_a_fenced_static_member_stops_with_a_config_error(member_of: Any) -> None:
    member = member_of("worker-0")
    with pytest.raises(ConfigError) as info:
        member._fetch_error(FENCED)
    assert info.value.exit_code == 2
    assert "kafka.instance_id 'worker-0'" in info.value.message
    assert "group workers" in info.value.message and "fenced" in info.value.message
    assert "FMNIST_KAFKA__INSTANCE_ID" in info.value.hint


class FencedHandle:
    """librdkafka's handle of a fenced member: owns partition 0, every commit is fatal."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def assignment(self) -> list[TopicPartition]:
        return tps(0)

    def commit(self, **_: Any) -> None:
        raise KafkaException(FENCED)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_fenced_commit_stops_the_worker_too(member_of: Any) -> None:
    member = member_of("worker-0")
    real, member._consumer = member._consumer, FencedHandle(member._consumer)
    member._held = frozenset({0})  # partition 0 assigned, as the rebalance callback records it
    try:
        with pytest.raises(ConfigError):
            member.commit([Message(b"", {}, None, "req", "req/0/4", None, 0.0, handle=(0, 4, 1))])
    finally:
        member._consumer = real


def test_a_fatal_error_without_an_instance_id_is_a_broker_error(member_of: Any) -> None:
    with pytest.raises(BrokerError):  # the worker makes a new consumer, as for any outage
        member_of()._fetch_error(KafkaError(KafkaError._FATAL, "something else"))
