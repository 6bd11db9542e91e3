"""Which Pub/Sub the clients reach: fmnist's resolved ``pubsub.emulator_host``, and nothing else.

google-cloud-pubsub follows ``PUBSUB_EMULATOR_HOST`` on its own when it builds a client's
transport. The broker must not let it: the loader already weighed that variable against the
user's settings (docs/brokers.md#google-variables). No network: making a client connects
nothing, and Google's credential lookup is replaced by anonymous credentials.
"""

from __future__ import annotations

from pathlib import Path

import google.auth
import pytest
from google.auth.credentials import AnonymousCredentials

from fmnist import config
from fmnist.brokers.pubsub import PubsubBroker


@pytest.fixture
def anonymous(clean_env: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    clean_env.setattr(google.auth, "default",
                      lambda *_, **__: (AnonymousCredentials(), "from-credentials"))
    for name, _ in config.GOOGLE_ENV:
        clean_env.delenv(name, raising=False)
    return clean_env


def targets(env: dict[str, str]) -> tuple[str, str, str]:
    broker = PubsubBroker(config.load(env=env))
    try:
        return broker.address, broker.publisher()._target, broker.subscriber()._target
    finally:
        broker.close()


def test_real_pubsub_stays_real_when_the_emulator_variable_is_set(
        fmnist_home: Path, anonymous: pytest.MonkeyPatch) -> None:
    anonymous.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:1")
    env = {"PUBSUB_EMULATOR_HOST": "127.0.0.1:1", "FMNIST_PUBSUB__EMULATOR_HOST": "",
           "FMNIST_PUBSUB__PROJECT_ID": "mine"}
    address, publisher, subscriber = targets(env)
    assert address == "pubsub.googleapis.com (project mine)"
    assert publisher == subscriber == "pubsub.googleapis.com:443"


def test_fmnist_s_emulator_wins_over_the_variable_when_the_user_set_it(
        fmnist_home: Path, anonymous: pytest.MonkeyPatch) -> None:
    anonymous.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:1")
    env = {"PUBSUB_EMULATOR_HOST": "127.0.0.1:1", "FMNIST_PUBSUB__EMULATOR_HOST": "127.0.0.1:2"}
    assert targets(env) == ("127.0.0.1:2", "127.0.0.1:2", "127.0.0.1:2")


def test_the_variable_selects_the_emulator_over_the_shipped_default(
        anonymous: pytest.MonkeyPatch) -> None:
    anonymous.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:3")
    assert targets({"PUBSUB_EMULATOR_HOST": "127.0.0.1:3"}) == (
        "127.0.0.1:3", "127.0.0.1:3", "127.0.0.1:3")


def test_real_pubsub_without_the_variable_is_google_s_own_client(
        fmnist_home: Path, anonymous: pytest.MonkeyPatch) -> None:
    assert targets({"FMNIST_PUBSUB__EMULATOR_HOST": ""})[1:] == (
        "pubsub.googleapis.com:443", "pubsub.googleapis.com:443")
