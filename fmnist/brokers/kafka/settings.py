"""librdkafka's configuration, built from the ``kafka.*`` settings, and the limits we hold it to."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fmnist.config import Config, KafkaConfig
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
COMPRESSIONS = ("", "gzip", "snappy", "lz4", "zstd")  # all built into librdkafka's wheel


def check(k: KafkaConfig) -> None:
    """What librdkafka would only refuse later, refused at once with the setting's name."""
    if k.compression not in COMPRESSIONS:
        raise ConfigError(f"Invalid config: kafka.compression must be one of "
                          f"{', '.join(repr(c) for c in COMPRESSIONS)}, got {k.compression!r}.",
                          "Fix it in your config file or FMNIST_KAFKA__COMPRESSION.")


def client_config(cfg: Config, timeout_ms: int, on_error: Any) -> dict[str, Any]:
    """librdkafka settings shared by admin, producer and consumers (from ``kafka.*``)."""
    k = cfg.kafka
    conf: dict[str, Any] = {
        "bootstrap.servers": ",".join(s.strip() for s in k.bootstrap_servers.split(",")
                                      if s.strip()),
        "client.id": k.client_id, "security.protocol": k.security_protocol,
        "socket.timeout.ms": timeout_ms, "reconnect.backoff.max.ms": 2000,
        # librdkafka logs through ours (``librdkafka_log``), not to stderr; errors it recovers
        # from on its own (a broker restart) reach ``on_error``. A broker closing an idle
        # connection (the admin client's, after 10 minutes) is not an error.
        "logger": librdkafka_log, "error_cb": on_error, "log.connection.close": False,
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


def producer_config(k: KafkaConfig, timeout_ms: int) -> dict[str, Any]:
    """The shared producer's own settings: idempotent with acks=all."""
    return {"acks": "all", "enable.idempotence": True,
            "linger.ms": k.linger_ms, "compression.type": k.compression or "none",
            "message.timeout.ms": max(30_000, k.linger_ms + 2 * timeout_ms),
            # the broker's default limit (1 MiB + overhead), as Java clients have it;
            # librdkafka's own default is 1,000,000 bytes
            "message.max.bytes": BROKER_MESSAGE_MAX_BYTES}


def consumer_config(k: KafkaConfig, group: str | None, max_hold_s: float | None = None
                    ) -> dict[str, Any]:
    """A consumer's own settings: commits only by hand, never a topic created by reading.

    ``max_hold_s`` becomes ``max.poll.interval.ms`` (librdkafka allows up to a day): a member
    that does not read again within it leaves the group and its partitions move on.
    """
    hold = {} if max_hold_s is None else {
        "max.poll.interval.ms": int(min(max(max_hold_s, 1.0), 86_400.0) * 1000)}
    return {**hold,
        # librdkafka wants a group id even for a reader that only assigns; a reader never
        # commits or subscribes, so the broker never hears of this one.
        "group.id": group or f"fmnist-reader-{uuid.uuid4().hex}",
        "enable.auto.commit": False, "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest", "fetch.wait.max.ms": k.fetch_max_wait_ms,
        "session.timeout.ms": SESSION_TIMEOUT_MS, "heartbeat.interval.ms": 1000,
        "allow.auto.create.topics": False, "enable.partition.eof": False}
