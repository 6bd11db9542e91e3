"""Secrets read from files (``kafka.sasl_password_file``), the login and ACL errors of the Kafka
adapter, and the ACLs the worker and the client get: no broker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException
from typer.testing import CliRunner

from fmnist import config
from fmnist.brokers.kafka import KafkaBroker, acls, errors
from fmnist.cli import app
from fmnist.errors import BrokerError, ConfigError

SASL = {"FMNIST_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "FMNIST_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "FMNIST_KAFKA__SASL_USERNAME": "fmnist-client"}


def secret(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "password"
    path.write_text(text)
    return path


def test_the_password_comes_from_its_file_without_the_trailing_newline(tmp_path: Path) -> None:
    path = secret(tmp_path, "s3cret-from-file\n")
    cfg = config.load(env={"FMNIST_KAFKA__SASL_PASSWORD_FILE": str(path)})
    assert cfg.kafka.sasl_password == "s3cret-from-file"
    assert cfg.kafka.sasl_password_file == path
    shown = config.as_dict(cfg)["kafka"]
    assert shown["sasl_password"] == "***"
    assert shown["sasl_password_file"] == str(path)  # the path is no secret


def test_a_file_key_in_a_config_file_is_relative_to_that_file(tmp_path: Path) -> None:
    secret(tmp_path, "from-yaml")
    (tmp_path / "kafka.yaml").write_text("kafka:\n  sasl_password_file: password\n")
    assert config.load(tmp_path / "kafka.yaml", env={}).kafka.sasl_password == "from-yaml"


def test_fmnist_config_shows_the_file_but_never_the_secret(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = secret(tmp_path, "never-printed-7f3a\n")
    monkeypatch.setenv("FMNIST_KAFKA__SASL_PASSWORD_FILE", str(path))
    for args in (["config"], ["config", "--json"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "never-printed-7f3a" not in result.output
        assert str(path) in result.output
    kafka = json.loads(CliRunner().invoke(app, ["config", "--json"]).output)["kafka"]
    assert kafka["sasl_password"] == "***"


@pytest.mark.parametrize(("setup", "words"), [
    ("missing", ["kafka.sasl_password_file", "FMNIST_KAFKA__SASL_PASSWORD_FILE", "cannot read",
                 "No such file"]),
    ("empty", ["kafka.sasl_password_file", "is empty"]),
    ("both", ["Both kafka.sasl_password", "kafka.sasl_password_file", "Keep one"]),
])
def test_an_unusable_password_file_is_a_config_error_naming_key_and_path(
        tmp_path: Path, setup: str, words: list[str]) -> None:
    path = tmp_path / "nope" if setup == "missing" else secret(
        tmp_path, "" if setup == "empty" else "in-the-file")
    env = {"FMNIST_KAFKA__SASL_PASSWORD_FILE": str(path)}
    if setup == "both":
        env["FMNIST_KAFKA__SASL_PASSWORD"] = "in-the-env"
    with pytest.raises(ConfigError) as caught:
        config.load(env=env)
    text = str(caught.value)
    for word in words:
        assert word in text, text
    assert "in-the-file" not in text and "in-the-env" not in text
    if setup != "both":
        assert str(path) in text


def test_secret_file_keys_and_is_secret() -> None:
    assert config.secret_file_keys("kafka") == {"sasl_password_file": "sasl_password"}
    assert config.is_secret("sasl_password") and config.is_secret("ssl.key.password")
    assert not config.is_secret("sasl_password_file")


def test_sasl_without_a_password_fails_as_a_broker_error_naming_the_file_key() -> None:
    with pytest.raises(BrokerError) as caught:
        KafkaBroker(config.load(env=SASL))
    assert caught.value.exit_code == 4
    assert "kafka.sasl_password is not set" in caught.value.message
    assert "FMNIST_KAFKA__SASL_PASSWORD_FILE" in str(caught.value.hint)
    no_user = {**SASL, "FMNIST_KAFKA__SASL_USERNAME": "", "FMNIST_KAFKA__SASL_PASSWORD": "x"}
    with pytest.raises(BrokerError, match="kafka.sasl_username is not set"):
        KafkaBroker(config.load(env=no_user))
    oauth = {"FMNIST_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
             "FMNIST_KAFKA__SASL_MECHANISM": "OAUTHBEARER"}
    KafkaBroker(config.load(env=oauth))  # logs in otherwise: no user name or password


@pytest.mark.parametrize(("code", "needs", "grant"), [
    (KafkaError.TOPIC_AUTHORIZATION_FAILED, {"Topic": ("Write", "res_predict")},
     "grant User:fmnist-worker Write on Topic:res_predict"),
    (KafkaError.GROUP_AUTHORIZATION_FAILED, {"Topic": ("Read", "req_predict"),
                                             "Group": ("Read", "fmnist-workers")},
     "grant User:fmnist-worker Read on Group:fmnist-workers"),
    (KafkaError.CLUSTER_AUTHORIZATION_FAILED, {},
     "grant User:fmnist-worker IdempotentWrite on Cluster:kafka-cluster"),
])
def test_a_missing_acl_is_named_in_the_message(code: int, needs: errors.Needs,
                                               grant: str) -> None:
    error = errors.translate("k:9093", "do it", KafkaException(KafkaError(code)),
                             "fmnist-worker", needs)
    assert error.exit_code == 4
    assert grant in error.message  # the message alone: a worker logs only that


def test_login_failures_say_what_to_fix() -> None:
    k = config.load(env={**SASL, "FMNIST_KAFKA__SASL_PASSWORD": "pw-9d1e"}).kafka
    refused = errors.login_failed("k:9093", k, KafkaError(KafkaError._AUTHENTICATION, "no"))
    assert "refused the login of user fmnist-client with SCRAM-SHA-512" in refused.message
    assert "FMNIST_KAFKA__SASL_PASSWORD_FILE" in str(refused.hint)
    assert "pw-9d1e" not in str(refused)
    tls = errors.login_failed("k:9093", k, KafkaError(KafkaError._SSL, "verify failed"))
    assert "TLS handshake" in tls.message and "FMNIST_KAFKA__SSL_CAFILE" in str(tls.hint)
    plain = errors.plaintext_refused("k:9093", config.load(env={}).kafka)
    assert "PLAINTEXT" in plain.message and "FMNIST_KAFKA__SECURITY_PROTOCOL" in str(plain.hint)


def test_the_client_gets_no_dead_letters_and_nobody_gets_delete_or_create() -> None:
    cfg = config.load(env={})
    granted = acls.grants(cfg, "w", "c")
    by = {(g.principal, g.operation.name, g.kind.name, g.name) for g in granted}
    assert ("c", "WRITE", "TOPIC", "req_predict") in by
    assert ("c", "READ", "TOPIC", "res_predict") in by
    assert ("w", "READ", "TOPIC", "req_predict") in by
    assert ("w", "READ", "GROUP", "fmnist-workers") in by
    for topic in ("res_predict", "req_predict.dlq", "fmnist_feedback", "req_predict.crashes"):
        assert ("w", "WRITE", "TOPIC", topic) in by
    assert not any(p == "c" and name == "req_predict.dlq" for p, _, _, name in by)
    assert not any(op in ("DELETE", "CREATE", "ALTER", "ALL", "ALTER_CONFIGS")
                   for _, op, _, _ in by)
    assert str(acls.Grant("c", acls.READ, acls.ResourceType.TOPIC, "res_predict.", True)) == \
        "User:c Read on Topic:res_predict.*"
