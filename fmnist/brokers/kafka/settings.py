"""librdkafka's configuration, built from the ``kafka.*`` settings, and the limits we hold it to."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer

from fmnist.config import Config, KafkaConfig, env_name, is_secret
from fmnist.errors import ConfigError

log = logging.getLogger("fmnist.brokers.kafka")
# librdkafka's own log. It reports at warning level what it retries and recovers from by
# itself (a group coordinator still loading after a broker start, a reconnect); what matters
# also reaches ``client_error`` or fails the call that needed it. So errors only, unless the
# user sets this logger's level.
librdkafka_log = logging.getLogger("fmnist.brokers.kafka.librdkafka")
if librdkafka_log.level == logging.NOTSET:
    librdkafka_log.setLevel(logging.ERROR)

CLOSE_TIMEOUT_S = 5.0
BROKER_MESSAGE_MAX_BYTES = 1_048_588  # Kafka's default message.max.bytes
SESSION_TIMEOUT_MS = 10_000  # a dead worker's partitions move on after this long
# Group members hand over only the partitions that move, and keep reading the others through a
# rebalance (docs/decisions.md#cooperative-rebalancing); ``consumer``'s callbacks assign
# incrementally, which only this protocol allows.
ASSIGNMENT_STRATEGY = "cooperative-sticky"
COMPRESSIONS = ("", "gzip", "snappy", "lz4", "zstd")  # all built into librdkafka's wheel

# librdkafka properties that ``kafka.extra`` may not set (docs/brokers.md#kafka-extra).
# Those with an fmnist key of their own: one place to set each, shown by `fmnist config`.
OWNED_BY_KEY = {
    "bootstrap.servers": "kafka.bootstrap_servers", "metadata.broker.list":
    "kafka.bootstrap_servers", "client.id": "kafka.client_id", "group.id": "kafka.group_id",
    "security.protocol": "kafka.security_protocol", "sasl.mechanism": "kafka.sasl_mechanism",
    "sasl.mechanisms": "kafka.sasl_mechanism", "sasl.username": "kafka.sasl_username",
    "sasl.password": "kafka.sasl_password", "ssl.ca.location": "kafka.ssl_cafile",
    "ssl.certificate.location": "kafka.ssl_certfile", "ssl.key.location": "kafka.ssl_keyfile",
    "compression.type": "kafka.compression", "compression.codec": "kafka.compression",
    "linger.ms": "kafka.linger_ms", "queue.buffering.max.ms": "kafka.linger_ms",
    "fetch.wait.max.ms": "kafka.fetch_max_wait_ms", "group.instance.id": "kafka.instance_id",
}
_COMMITS = "fmnist commits a request's offset only after its answer is published (at least once)"
_IDEMPOTENT = "the producer is idempotent with acks=all, so a retried send is never lost or doubled"
_CALLBACK = "fmnist wires this Python callback itself; a config value cannot be a function"
# Those whose change would break a guarantee fmnist makes, or its own plumbing.
GUARDED = {
    "enable.auto.commit": _COMMITS, "enable.auto.offset.store": _COMMITS,
    "enable.idempotence": _IDEMPOTENT, "acks": _IDEMPOTENT, "request.required.acks": _IDEMPOTENT,
    "auto.offset.reset": "workers and readers start from the earliest message they have not "
                         "seen; `latest` would skip requests sent before a worker started",
    "enable.partition.eof": "fmnist's consume loop takes no end-of-partition events",
    "partition.assignment.strategy": "workers assign and revoke partitions incrementally "
                                     "(cooperative-sticky), which other strategies refuse",
    "allow.auto.create.topics": "fmnist creates its topics itself (`broker.create_topics`), "
                                "with its partitions and settings",
    **{name: _CALLBACK for name in ("error_cb", "logger", "on_delivery", "dr_cb", "dr_msg_cb",
                                    "stats_cb", "throttle_cb", "oauth_cb", "on_commit")},
}
# librdkafka's own log while ``check`` makes its throwaway clients (no brokers: it would warn).
_check_log = logging.getLogger("fmnist.brokers.kafka.check")
_check_log.propagate = False
_check_log.addHandler(logging.NullHandler())


def check(k: KafkaConfig) -> None:
    """What librdkafka would only refuse later, refused at once with the setting's name."""
    if k.compression not in COMPRESSIONS:
        raise ConfigError(f"Invalid config: kafka.compression must be one of "
                          f"{', '.join(repr(c) for c in COMPRESSIONS)}, got {k.compression!r}.",
                          "Fix it in your config file or FMNIST_KAFKA__COMPRESSION.")
    check_extra(k)


def check_extra(k: KafkaConfig) -> None:
    """``kafka.extra`` as librdkafka judges it: a producer and a consumer are made (and
    dropped) with the whole config but no brokers, so nothing connects. An unknown property,
    a bad value or a combination librdkafka refuses is a ConfigError naming
    ``kafka.extra.<property>`` and librdkafka's own words, with secrets masked."""
    for name in k.extra:
        if name in OWNED_BY_KEY:
            key = OWNED_BY_KEY[name]
            raise ConfigError(f"Invalid config: kafka.extra.{name} is what `{key}` sets.",
                              f"Set `{key}` (or {env_name(key)}) instead, and remove `{name}` "
                              "from kafka.extra / FMNIST_KAFKA__EXTRA.")
        if name in GUARDED:
            raise ConfigError(f"Invalid config: kafka.extra.{name} cannot be set: "
                              f"{GUARDED[name]}.",
                              f"Remove `{name}` from kafka.extra / FMNIST_KAFKA__EXTRA "
                              "(docs/brokers.md#kafka-extra).")
    if not k.extra:
        return
    shared = {**_shared_config(k), "logger": _check_log}
    del shared["bootstrap.servers"]
    for role in ("producer", "consumer"):
        try:
            if role == "producer":
                Producer({**shared, **producer_config(k, 10_000)})
            else:
                Consumer({**shared, **consumer_config(k, None)}).close()
        except (KafkaException, ValueError, TypeError) as exc:
            raise _extra_error(k.extra, role, exc) from None


def _extra_error(extra: Mapping[str, str], role: str, exc: BaseException) -> ConfigError:
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else exc
    message = str(err.str() if hasattr(err, "str") else err).strip()
    for name, value in extra.items():
        if is_secret(name) and value:
            message = message.replace(value, "***")
    named = [name for name in extra if f'"{name}"' in message or f"`{name}" in message]
    where = ", ".join(f"kafka.extra.{name}" for name in named) or "kafka.extra"
    return ConfigError(f"Invalid config: {where}: librdkafka refuses it ({role}): {message}",
                       "Fix it in kafka.extra / FMNIST_KAFKA__EXTRA; librdkafka's properties: "
                       "https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md")


def _shared_config(k: KafkaConfig) -> dict[str, Any]:
    """The properties every client gets from ``kafka.*`` (before ``kafka.extra``)."""
    conf: dict[str, Any] = {
        "bootstrap.servers": ",".join(s.strip() for s in k.bootstrap_servers.split(",")
                                      if s.strip()),
        "client.id": k.client_id, "security.protocol": k.security_protocol,
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


def client_config(cfg: Config, timeout_ms: int, on_error: Any) -> dict[str, Any]:
    """librdkafka settings shared by admin, producer and consumers (from ``kafka.*``), with
    ``kafka.extra`` on top."""
    return {**_shared_config(cfg.kafka),
            "socket.timeout.ms": timeout_ms, "reconnect.backoff.max.ms": 2000,
            # librdkafka logs through ours (``librdkafka_log``), not to stderr; errors it
            # recovers from on its own (a broker restart) reach ``on_error``. A broker closing
            # an idle connection (the admin client's, after 10 minutes) is not an error.
            "logger": librdkafka_log, "error_cb": on_error, "log.connection.close": False,
            **cfg.kafka.extra}


def producer_config(k: KafkaConfig, timeout_ms: int) -> dict[str, Any]:
    """The shared producer's own settings: idempotent with acks=all; ``kafka.extra`` on
    top (callers merge this over ``client_config``, so it must come last here too)."""
    return {"acks": "all", "enable.idempotence": True,
            "linger.ms": k.linger_ms, "compression.type": k.compression or "none",
            "message.timeout.ms": max(30_000, k.linger_ms + 2 * timeout_ms),
            # the broker's default limit (1 MiB + overhead), as Java clients have it;
            # librdkafka's own default is 1,000,000 bytes
            "message.max.bytes": BROKER_MESSAGE_MAX_BYTES, **k.extra}


def consumer_config(k: KafkaConfig, group: str | None, max_hold_s: float | None = None
                    ) -> dict[str, Any]:
    """A consumer's own settings: commits only by hand, never a topic created by reading;
    ``kafka.extra`` on top (last, as in ``producer_config``).

    ``max_hold_s`` becomes ``max.poll.interval.ms`` (librdkafka allows up to a day): a member
    that does not read again within it leaves the group and its partitions move on.

    A group member (``group`` given) rebalances cooperatively (``ASSIGNMENT_STRATEGY``) and,
    with ``kafka.instance_id``, is a static member (``group.instance.id``). A reader only
    assigns, so it gets neither.
    """
    hold = {} if max_hold_s is None else {
        "max.poll.interval.ms": int(min(max(max_hold_s, 1.0), 86_400.0) * 1000)}
    member: dict[str, Any] = {}
    if group is not None:
        member["partition.assignment.strategy"] = ASSIGNMENT_STRATEGY
        if k.instance_id:
            member["group.instance.id"] = k.instance_id
    return {**hold, **member,
        # librdkafka wants a group id even for a reader that only assigns; a reader never
        # commits or subscribes, so the broker never hears of this one.
        "group.id": group or f"fmnist-reader-{uuid.uuid4().hex}",
        "enable.auto.commit": False, "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest", "fetch.wait.max.ms": k.fetch_max_wait_ms,
        "session.timeout.ms": SESSION_TIMEOUT_MS, "heartbeat.interval.ms": 1000,
        "allow.auto.create.topics": False, "enable.partition.eof": False, **k.extra}
