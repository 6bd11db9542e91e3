"""librdkafka's errors as BrokerErrors that say what to do next, and the classes of error codes
the adapter acts on."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from confluent_kafka import KafkaError, KafkaException

from fmnist.errors import BrokerError, BrokerTimeout, ConfigError, FmnistError

log = logging.getLogger("fmnist.brokers.kafka")

# A rebalance took the partitions away: the commit is refused, the new owner re-delivers.
REBALANCED = {KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
              KafkaError.UNKNOWN_MEMBER_ID, KafkaError.FENCED_INSTANCE_ID,
              KafkaError.STALE_MEMBER_EPOCH, KafkaError._STATE}
TIMEOUTS = {KafkaError._TIMED_OUT, KafkaError.REQUEST_TIMED_OUT, KafkaError._MSG_TIMED_OUT,
            KafkaError._TIMED_OUT_QUEUE}
UNREACHABLE = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE}
REFUSED = {KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
           KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError.SASL_AUTHENTICATION_FAILED,
           KafkaError._AUTHENTICATION}
NO_TOPIC = {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC,
            KafkaError._UNKNOWN_PARTITION}
# What a client reports about a topic created a moment ago, until its metadata catches up.
SETTLING = NO_TOPIC | {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE}


def error_of(exc: BaseException) -> KafkaError | None:
    """The KafkaError inside a KafkaException (None for anything else)."""
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    return err if isinstance(err, KafkaError) else None


def code_of(exc: BaseException) -> int | None:
    err = error_of(exc)
    return None if err is None else err.code()


def reason_of(exc: BaseException) -> str:
    err = error_of(exc)
    if err is not None:
        return f"{err.name()}: {err.str()}"
    return str(exc) or type(exc).__name__


def unreachable(address: str, detail: str) -> BrokerError:
    return BrokerError(f"Kafka at {address} is not reachable ({detail}).",
                       "Start the local brokers with `scripts/brokers up` (Kafka alone: "
                       "`scripts/kafka.sh up`), or set `--bootstrap-servers` / "
                       "FMNIST_KAFKA__BOOTSTRAP_SERVERS to where your cluster runs.")


def translate(address: str, what: str, exc: BaseException) -> BrokerError:
    """A confluent-kafka exception as a BrokerError that says what to do next."""
    code, reason = code_of(exc), reason_of(exc)
    if code in UNREACHABLE:
        return unreachable(address, f"{what}: {reason}")
    if code in REFUSED:
        return BrokerError(f"Kafka at {address} refused to {what}: {reason}",
                           "Check `kafka.security_protocol`, `kafka.sasl_*` and `kafka.ssl_*` "
                           "(FMNIST_KAFKA__SASL_USERNAME, ...) and the ACLs of that user.")
    if code == KafkaError.MSG_SIZE_TOO_LARGE:
        return BrokerError(f"Kafka at {address} refused to {what}: {reason}",
                           "The message is over Kafka's size limit (message.max.bytes, 1 MiB "
                           "by default): send a smaller image (a 28x28 PNG is under 1 KB).")
    if code in TIMEOUTS:
        return BrokerTimeout(f"Kafka at {address} did not answer in time ({what}: "
                             f"{reason}).", "Is the broker up and not overloaded? "
                             "`scripts/kafka.sh status` checks the local one.")
    return BrokerError(f"Kafka at {address}: could not {what}: {reason}",
                       "Is the broker up? `scripts/kafka.sh status` checks the local one.")


@contextmanager
def translated(address: str, what: str) -> Iterator[None]:
    """Raise what a confluent-kafka call raises as ``translate`` words it."""
    try:
        yield
    except FmnistError:
        raise
    except KafkaException as exc:
        raise translate(address, what, exc) from None


def fenced(group: str | None, instance_id: str, err: KafkaError) -> ConfigError:
    """A static member that another consumer with its ``group.instance.id`` fenced out."""
    return ConfigError(
        f"Another consumer joined group {group} with this worker's kafka.instance_id "
        f"{instance_id!r}, so Kafka fenced this one out ({err.str()}).",
        "Give every worker its own id (FMNIST_KAFKA__INSTANCE_ID; on Kubernetes its pod's "
        "name: docs/kubernetes.md#static-membership), or leave it empty.")


def client_error(err: KafkaError) -> None:
    """librdkafka's report of a client-wide error; it retries on its own, so this is a log
    line (what the caller sees is the call that then fails or times out)."""
    level = logging.ERROR if err.fatal() else logging.WARNING
    log.log(level, "Kafka client: %s: %s", err.name(), err.str())
