"""The ACLs that let a worker and a client use a Kafka cluster with an authorizer, and nothing more.

Run as the cluster's admin (a super user), ``python -m fmnist.brokers.kafka.acls --worker W
--client C`` creates the topics the effective fmnist config names and grants (idempotently):

* the worker ``W``: Read the requests (and its consumer group ``kafka.group_id``); Write the
  answers, the per-client reply topics (``<response_topic>.*``), the dead letters and the
  labelled requests' records (``feedback.topic``); Read and Write the crash reports
  (``broker.crash_topic``); Read the model store (``registry.topic``, ``registry.blob_topic``)
  and Read and Write its events (``registry.events_topic``);
* the client ``C``: Write the requests; Read the answers and the per-client reply topics;
* both: Describe on the groups ``fmnist-reader-*``: a private reader (the client's answers,
  the worker's crash reports and model events) assigns its partitions and never joins a group
  or commits, but librdkafka still looks up its group's coordinator, which takes Describe.

Each Read or Write comes with Describe on the same topic (a client must see a topic in the
cluster's metadata to use it). Nothing else: no Create, Delete or Alter anywhere, so workers and
clients run with ``broker.create_topics: false`` and the admin creates the topics here. What
librdkafka needs besides was found against Kafka 4.2 (tests/integration/test_kafka_auth.py):
the idempotent producer needs no IdempotentWrite on the cluster (Kafka grants it with Write on
any topic since 2.8, KIP-679).

``scripts/kafka.sh`` runs this after starting its ``KAFKA_SECURITY=sasl_ssl`` broker.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    ResourcePatternType,
    ResourceType,
)

from fmnist.brokers.kafka.errors import READER_GROUPS
from fmnist.config import Config
from fmnist.errors import FmnistError

READ, WRITE, DESCRIBE = AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE
LITERAL, PREFIXED = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED


@dataclass(frozen=True)
class Grant:
    """One ACL: ``principal`` may ``operation`` on ``kind:name`` (``prefixed``: every name that
    starts with ``name``)."""

    principal: str
    operation: AclOperation
    kind: ResourceType
    name: str
    prefixed: bool = False

    def binding(self) -> AclBinding:
        return AclBinding(self.kind, self.name, PREFIXED if self.prefixed else LITERAL,
                          f"User:{self.principal}", "*", self.operation, AclPermissionType.ALLOW)

    def __str__(self) -> str:
        star = "*" if self.prefixed else ""
        return (f"User:{self.principal} {self.operation.name.title()} on "
                f"{self.kind.name.title()}:{self.name}{star}")


def _topic(principal: str, ops: tuple[AclOperation, ...], name: str,
           prefixed: bool = False) -> list[Grant]:
    return [Grant(principal, op, ResourceType.TOPIC, name, prefixed) for op in (*ops, DESCRIBE)]


def grants(cfg: Config, worker: str, client: str) -> list[Grant]:
    """The worker's and the client's ACLs on the topics ``cfg`` names (see the module)."""
    b, r = cfg.broker, cfg.registry
    replies = f"{b.response_topic}."
    return [
        *_topic(worker, (READ,), b.request_topic),
        Grant(worker, READ, ResourceType.GROUP, cfg.kafka.group_id),
        *_topic(worker, (WRITE,), b.response_topic),
        *_topic(worker, (WRITE,), replies, prefixed=True),
        *_topic(worker, (WRITE,), b.dlq_topic),
        *_topic(worker, (WRITE,), cfg.feedback.topic),
        *_topic(worker, (READ, WRITE), b.crash_topic),
        *_topic(worker, (READ,), r.topic),
        *_topic(worker, (READ,), r.blob_topic),
        *_topic(worker, (READ, WRITE), r.events_topic),
        Grant(worker, DESCRIBE, ResourceType.GROUP, READER_GROUPS, prefixed=True),
        *_topic(client, (WRITE,), b.request_topic),
        *_topic(client, (READ,), b.response_topic),
        *_topic(client, (READ,), replies, prefixed=True),
        Grant(client, DESCRIBE, ResourceType.GROUP, READER_GROUPS, prefixed=True),
    ]


def topics(cfg: Config) -> tuple[list[str], list[str]]:
    """The topics the admin creates: (ordinary ones, the model store's compacted ones)."""
    b, r = cfg.broker, cfg.registry
    return ([b.request_topic, b.response_topic, b.dlq_topic, b.crash_topic, cfg.feedback.topic,
             r.events_topic], [r.topic, r.blob_topic])


def apply(cfg: Config, worker: str, client: str, without: tuple[Grant, ...] = ()) -> list[Grant]:
    """As the admin ``cfg`` logs in as: create the topics, grant every ACL of ``grants`` (but
    those in ``without``), and return what was granted."""
    from fmnist.brokers.kafka import log
    from fmnist.brokers.kafka.broker import KafkaBroker

    broker = KafkaBroker(cfg)
    try:
        broker.check(cfg.broker.connect_timeout_s)
        plain, compacted = topics(cfg)
        broker.ensure_topics(plain)
        log.ensure_compacted(broker, compacted)
        wanted = [g for g in grants(cfg, worker, client) if g not in without]
        admin, timeout_s = broker.admin(), broker.timeout_ms / 1000
        with broker.translated("create ACLs"):
            for future in admin.create_acls([g.binding() for g in wanted],
                                            request_timeout=timeout_s).values():
                future.result()
        return wanted
    finally:
        broker.close()


def revoke(cfg: Config, grant: Grant) -> None:
    """As the admin: remove one ACL (a test takes one away to see the worker name it)."""
    from fmnist.brokers.kafka.broker import KafkaBroker

    broker = KafkaBroker(cfg)
    try:
        b = grant.binding()
        found = AclBindingFilter(b.restype, b.name, b.resource_pattern_type, b.principal,
                                 b.host, b.operation, b.permission_type)
        with broker.translated("delete an ACL"):
            for future in broker.admin().delete_acls(
                    [found], request_timeout=broker.timeout_ms / 1000).values():
                future.result()
    finally:
        broker.close()


def main(argv: list[str] | None = None) -> int:
    from fmnist import config

    parser = argparse.ArgumentParser(
        prog="python -m fmnist.brokers.kafka.acls",
        description="As the Kafka admin (the kafka.* config, e.g. FMNIST_KAFKA__SASL_USERNAME="
                    "admin), create fmnist's topics and grant the worker's and the client's "
                    "ACLs on them.")
    parser.add_argument("--worker", default="fmnist-worker", help="the worker's user name")
    parser.add_argument("--client", default="fmnist-client", help="the client's user name")
    args = parser.parse_args(argv)
    try:
        granted = apply(config.load(), args.worker, args.client)
    except (FmnistError, KafkaException) as exc:
        print(f"acls: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    for grant in granted:
        print(f"granted {grant}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
