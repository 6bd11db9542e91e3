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
from fmnist.brokers.kafka import KafkaBroker, settings
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


# --- kafka.extra ---------------------------------------------------------------------------


def test_extra_properties_reach_every_client_last(fmnist_home: Path) -> None:
    kafka = broker(extra="client.rack=eu-west-1a,message.max.bytes=2000,"
                         "session.timeout.ms=45000,ssl.key.password=pw")
    k = kafka.cfg.kafka
    admin = kafka.client_config()
    producer = {**admin, **settings.producer_config(k, 10_000)}
    consumer = {**admin, **settings.consumer_config(k, "g")}
    for conf in (admin, producer, consumer):
        assert (conf["client.rack"], conf["ssl.key.password"]) == ("eu-west-1a", "pw")
    # over fmnist's own tuning: the producer's size limit, the consumer's session
    assert producer["message.max.bytes"] == "2000"
    assert consumer["session.timeout.ms"] == "45000"
    Producer(producer)  # librdkafka takes the merged configs as they are
    Consumer(consumer).close()


@pytest.mark.skipif(not CA.exists(), reason="needs a CA bundle at /etc/ssl/certs")
def test_oauthbearer_oidc_needs_only_config(fmnist_home: Path) -> None:
    kafka = broker(security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER",
                   ssl_cafile=str(CA), extra=(
                       '{"sasl.oauthbearer.method": "oidc", '
                       '"sasl.oauthbearer.client.id": "fmnist", '
                       '"sasl.oauthbearer.client.secret": "s3cret", '
                       '"sasl.oauthbearer.token.endpoint.url": "https://127.0.0.1:1/token", '
                       '"sasl.oauthbearer.scope": "kafka,profile"}'))
    assert kafka.client_config()["sasl.oauthbearer.scope"] == "kafka,profile"


@pytest.mark.parametrize(("extra", "named", "librdkafka_says"), [
    ("client.rak=eu", "kafka.extra.client.rak", 'No such configuration property: "client.rak"'),
    ("message.max.bytes=lots", "kafka.extra.message.max.bytes",
     'Invalid value for configuration property "message.max.bytes"'),
    ("queued.min.messages=0", "kafka.extra.queued.min.messages", "outside allowed range"),
    # a combination: only the consumer refuses it (fmnist sets session.timeout.ms)
    ("group.protocol=consumer", "kafka.extra.group.protocol",
     "`session.timeout.ms` is not supported for `group.protocol=consumer`"),
])
def test_librdkafka_refuses_a_bad_extra_property_naming_it(fmnist_home: Path, extra: str,
                                                          named: str,
                                                          librdkafka_says: str) -> None:
    with pytest.raises(ConfigError) as info:
        broker(extra=extra)
    assert info.value.message.startswith(f"Invalid config: {named}: librdkafka refuses it")
    assert librdkafka_says in info.value.message
    assert "FMNIST_KAFKA__EXTRA" in info.value.hint


def test_a_combination_librdkafka_refuses_at_creation_names_the_property(
        fmnist_home: Path) -> None:
    with pytest.raises(ConfigError) as info:
        broker(security_protocol="SASL_PLAINTEXT", sasl_mechanism="OAUTHBEARER",
               extra="sasl.oauthbearer.method=oidc")
    assert "kafka.extra.sasl.oauthbearer.method" in info.value.message
    assert "`sasl.oauthbearer.token.endpoint.url` is mandatory" in info.value.message


@pytest.mark.parametrize(("name", "key"), [("bootstrap.servers", "kafka.bootstrap_servers"),
                                           ("client.id", "kafka.client_id"),
                                           ("sasl.password", "kafka.sasl_password"),
                                           ("compression.codec", "kafka.compression"),
                                           ("group.instance.id", "kafka.instance_id")])
def test_a_property_with_an_fmnist_key_is_refused_naming_the_key(fmnist_home: Path, name: str,
                                                                 key: str) -> None:
    with pytest.raises(ConfigError) as info:
        broker(extra=f"{name}=x")
    assert f"kafka.extra.{name} is what `{key}` sets" in info.value.message
    assert config.env_name(key) in info.value.hint


@pytest.mark.parametrize(("name", "why"), [("enable.auto.commit", "at least once"),
                                           ("enable.idempotence", "idempotent"),
                                           ("acks", "acks=all"),
                                           ("auto.offset.reset", "earliest"),
                                           ("partition.assignment.strategy",
                                            "cooperative-sticky"),
                                           ("error_cb", "Python callback")])
def test_a_property_fmnist_relies_on_is_refused_saying_why(fmnist_home: Path, name: str,
                                                          why: str) -> None:
    with pytest.raises(ConfigError) as info:
        broker(extra=f"{name}=1")
    assert f"kafka.extra.{name} cannot be set" in info.value.message
    assert why in info.value.message


def test_a_secret_in_librdkafka_s_message_is_masked() -> None:
    extra = {"ssl.key.password": "hunter2", "client.rack": "eu"}
    error = settings._extra_error(extra, "producer", ValueError('"ssl.key.password" hunter2 eu'))
    assert "hunter2" not in error.message
    assert '"ssl.key.password" *** eu' in error.message
    assert "kafka.extra.ssl.key.password" in error.message


def test_no_extra_makes_no_throwaway_clients(fmnist_home: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("a client was made")

    monkeypatch.setattr(settings, "Producer", refuse)
    monkeypatch.setattr(settings, "Consumer", refuse)
    broker()


# --- group membership: cooperative rebalancing, static members ------------------------------


def test_group_members_rebalance_cooperatively_and_readers_join_no_group(
        fmnist_home: Path) -> None:
    k = broker(instance_id="worker-0").cfg.kafka
    member, reader = settings.consumer_config(k, "g"), settings.consumer_config(k, None)
    assert member["partition.assignment.strategy"] == "cooperative-sticky"
    assert member["group.instance.id"] == "worker-0"
    # a reader only assigns: no strategy, and an instance id would be one per process anyway
    assert "partition.assignment.strategy" not in reader and "group.instance.id" not in reader


def test_no_instance_id_is_dynamic_membership(fmnist_home: Path) -> None:
    assert "group.instance.id" not in settings.consumer_config(broker().cfg.kafka, "g")


def test_librdkafka_takes_a_static_cooperative_member_with_fmnist_s_session(
        fmnist_home: Path) -> None:
    # a pod name: the id docs/kubernetes.md#static-membership gives each worker
    kafka = broker(instance_id="fmnist-worker-7d9f8c6b5-x2x4q")
    conf = {**kafka.client_config(), **settings.consumer_config(kafka.cfg.kafka, "g")}
    assert conf["session.timeout.ms"] == settings.SESSION_TIMEOUT_MS
    Consumer(conf).close()  # raises KafkaException for a property or value it refuses


@pytest.mark.parametrize("bad", ["worker 0", "w/0", "pod:0", ".", "..", "x" * 250, "wörker"])
def test_an_instance_id_kafka_would_refuse_is_refused_naming_its_variable(
        fmnist_home: Path, bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        broker(instance_id=bad)
    assert info.value.message.startswith("Invalid config: kafka.instance_id must be")
    assert "environment variable FMNIST_KAFKA__INSTANCE_ID" in info.value.message
    assert info.value.exit_code == 2


@pytest.mark.parametrize("good", ["", "w", "fmnist-worker-0", "host.example_1-2", "x" * 249])
def test_an_instance_id_kafka_accepts_is_taken(fmnist_home: Path, good: str) -> None:
    assert broker(instance_id=good).cfg.kafka.instance_id == good
