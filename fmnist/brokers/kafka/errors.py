"""librdkafka's errors as BrokerErrors that say what to do next, and the classes of error codes
the adapter acts on."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from confluent_kafka import KafkaError, KafkaException

from fmnist.config import KafkaConfig, env_name
from fmnist.errors import BrokerError, BrokerTimeout, ConfigError, FmnistError

log = logging.getLogger("fmnist.brokers.kafka")

# A rebalance took the partitions away: the commit is refused, the new owner re-delivers.
REBALANCED = {KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
              KafkaError.UNKNOWN_MEMBER_ID, KafkaError.FENCED_INSTANCE_ID,
              KafkaError.STALE_MEMBER_EPOCH, KafkaError._STATE}
TIMEOUTS = {KafkaError._TIMED_OUT, KafkaError.REQUEST_TIMED_OUT, KafkaError._MSG_TIMED_OUT,
            KafkaError._TIMED_OUT_QUEUE}
UNREACHABLE = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE}
# A missing ACL, by the kind of resource it is missing on.
UNAUTHORIZED = {KafkaError.TOPIC_AUTHORIZATION_FAILED: "Topic",
                KafkaError.GROUP_AUTHORIZATION_FAILED: "Group",
                KafkaError.CLUSTER_AUTHORIZATION_FAILED: "Cluster"}
# The login itself failed: a wrong user or password, or a TLS handshake the client refused.
LOGIN_FAILED = {KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError._AUTHENTICATION,
                KafkaError._SSL}
REFUSED = set(UNAUTHORIZED) | LOGIN_FAILED
# The group id prefix of private readers (settings.consumer_config): librdkafka looks their
# group's coordinator up, which takes Describe on the group.
READER_GROUPS = "fmnist-reader-"
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


# What an operation needs, by resource kind: {"Topic": ("Read", "req_predict"), ...}. A name
# ending in "*" is a prefix (a prefixed ACL).
Needs = Mapping[str, tuple[str, str]]
_DEFAULT_NEED = {"Cluster": ("IdempotentWrite", "kafka-cluster")}


def grant(principal: str, kind: str, needs: Needs) -> str:
    """The ACL to grant, as Kafka's tools name it: "User:fmnist-worker Write on Topic:x"."""
    operation, name = {**_DEFAULT_NEED, **needs}.get(kind, ("All", "?"))
    return f"User:{principal or 'ANONYMOUS'} {operation} on {kind}:{name}"


def unauthorized(address: str, what: str, reason: str, principal: str, kind: str,
                 needs: Needs) -> BrokerError:
    """A missing ACL, named in the message itself (a worker logs only the message)."""
    return BrokerError(f"Kafka at {address} refused to {what} ({reason}): grant "
                       f"{grant(principal, kind, needs)}.",
                       "Ask the cluster's admin for that ACL (docs/brokers.md#authenticated-kafka"
                       " lists what a worker and a client need), or log in as a user that has it"
                       " (kafka.sasl_username / FMNIST_KAFKA__SASL_USERNAME).")


def login_failed(address: str, k: KafkaConfig, err: KafkaError) -> BrokerError:
    """The broker refused the login, or the client refused the broker's certificate."""
    if err.code() == KafkaError._SSL:
        return BrokerError(f"The TLS handshake with Kafka at {address} failed: {err.str()}",
                           "Set kafka.ssl_cafile / FMNIST_KAFKA__SSL_CAFILE to the CA that "
                           "signed the broker's certificate (the local secure broker's: "
                           ".state/kafka-sasl_ssl/certs/ca.pem), and connect by a name the "
                           "certificate lists.")
    return BrokerError(f"Kafka at {address} refused the login of user "
                       f"{k.sasl_username or '(none)'} with {k.sasl_mechanism}: wrong user name "
                       f"or password ({err.name()}).",
                       "Fix kafka.sasl_username / FMNIST_KAFKA__SASL_USERNAME or the password: "
                       "kafka.sasl_password_file / FMNIST_KAFKA__SASL_PASSWORD_FILE (a file "
                       "holding only the password), or kafka.sasl_password / "
                       "FMNIST_KAFKA__SASL_PASSWORD.")


def plaintext_refused(address: str, k: KafkaConfig) -> BrokerError:
    """A plaintext client at a listener that wants TLS or SASL: the broker hangs up at once."""
    return BrokerError(f"Kafka at {address} hung up before answering: its listener expects "
                       f"TLS or SASL, and kafka.security_protocol is {k.security_protocol}.",
                       "Set kafka.security_protocol (FMNIST_KAFKA__SECURITY_PROTOCOL, e.g. "
                       "SASL_SSL), kafka.sasl_mechanism, kafka.sasl_username, "
                       "kafka.sasl_password_file and kafka.ssl_cafile (FMNIST_KAFKA__...).")


def credentials_missing(address: str, k: KafkaConfig) -> BrokerError | None:
    """SASL PLAIN or SCRAM without a user name or password: librdkafka would refuse to make the
    client (OAUTHBEARER and GSSAPI log in otherwise)."""
    missing = [key for key, value in (("kafka.sasl_username", k.sasl_username),
                                      ("kafka.sasl_password", k.sasl_password)) if not value]
    if k.sasl_mechanism.upper() not in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") or not missing:
        return None
    password = ("kafka.sasl_password_file / FMNIST_KAFKA__SASL_PASSWORD_FILE (or "
                "kafka.sasl_password / FMNIST_KAFKA__SASL_PASSWORD)")
    how = [password if key.endswith("password") else f"{key} / {env_name(key)}"
           for key in missing]
    return BrokerError(f"Kafka at {address} needs a login ({k.sasl_mechanism}) and "
                       f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set.",
                       f"Set {' and '.join(how)}.")


def translate(address: str, what: str, exc: BaseException, principal: str = "",
              needs: Needs | None = None) -> BrokerError:
    """A confluent-kafka exception as a BrokerError that says what to do next; a missing ACL
    names the one to grant (``principal`` needs ``needs`` for ``what``)."""
    code, reason = code_of(exc), reason_of(exc)
    if code in UNREACHABLE:
        return unreachable(address, f"{what}: {reason}")
    if code in UNAUTHORIZED:
        return unauthorized(address, what, reason, principal, UNAUTHORIZED[code], needs or {})
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
def translated(address: str, what: str, principal: str = "",
               needs: Needs | None = None) -> Iterator[None]:
    """Raise what a confluent-kafka call raises as ``translate`` words it."""
    try:
        yield
    except FmnistError:
        raise
    except KafkaException as exc:
        raise translate(address, what, exc, principal, needs) from None


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
