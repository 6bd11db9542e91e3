"""How `kafka.*` settings become librdkafka's, checked by librdkafka itself.

No broker needed: librdkafka validates every property name and value when a client is made
(an unknown name, or a value its build cannot honour, is an error at once), and connects
only later. The clients here point at a port nothing listens on and are dropped unused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from fmnist import config
from fmnist.brokers.kafka import KafkaBroker
from fmnist.errors import ConfigError

CA = Path("/etc/ssl/certs/ca-certificates.crt")  # Debian's bundle, present with ca-certificates


def broker(**kafka: str) -> KafkaBroker:
    env = {f"FMNIST_KAFKA__{key.upper()}": value for key, value in kafka.items()}
    return KafkaBroker(config.load(env={"FMNIST_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1", **env},
                                   use_default_file=False))


@pytest.mark.skipif(not CA.exists(), reason="needs a CA bundle at /etc/ssl/certs")
def test_sasl_over_tls_settings_reach_librdkafka_under_its_names(fmnist_home: Path) -> None:
    kafka = broker(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                   sasl_username="fmnist", sasl_password="s3cret", ssl_cafile=str(CA))
    conf = kafka.client_config()
    assert {k: conf[k] for k in ("bootstrap.servers", "security.protocol", "sasl.mechanism",
                                 "sasl.username", "sasl.password", "ssl.ca.location")} == {
        "bootstrap.servers": "127.0.0.1:1", "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "fmnist",
        "sasl.password": "s3cret", "ssl.ca.location": str(CA)}
    Producer(conf)  # raises KafkaException for a property librdkafka does not know or support
    Consumer({**conf, "group.id": "g"}).close()


@pytest.mark.parametrize("compression", ["", "gzip", "snappy", "lz4", "zstd"])
def test_the_producer_settings_with_every_offered_compression_are_accepted(
        fmnist_home: Path, compression: str) -> None:
    # idempotence, acks=all, the size limit, linger and this compression together: librdkafka
    # refuses a combination it cannot honour (acks other than all with idempotence, say)
    kafka = broker(compression=compression)
    assert kafka.shared_producer() is kafka.shared_producer()


def test_an_unknown_compression_is_refused_naming_the_choices(fmnist_home: Path) -> None:
    with pytest.raises(ConfigError) as info:
        broker(compression="brotli")
    assert "'gzip', 'snappy', 'lz4', 'zstd'" in info.value.message
    assert "FMNIST_KAFKA__COMPRESSION" in info.value.hint
