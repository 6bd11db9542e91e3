"""serve.metrics_host: the health server listens where it is told, and nowhere else.

Linux routes all of 127.0.0.0/8 to the loopback interface, but a socket bound to 127.0.0.1
accepts only connections to 127.0.0.1: a connection to 127.0.0.2 tells "this address only"
from "every interface" without needing a second network interface."""

from __future__ import annotations

import socket

import pytest

from fmnist import config
from fmnist.errors import ConfigError
from fmnist.serving.metrics import HealthServer, Metrics
from tests.unit.test_worker import cfg, make_worker  # noqa: F401


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.parametrize(("host", "via_other_address"), [("127.0.0.1", False), ("0.0.0.0", True)])
def test_the_health_server_listens_on_the_configured_address_only(
        cfg, host: str, via_other_address: bool) -> None:  # noqa: F811
    worker, *_ = make_worker(cfg)
    server = HealthServer(0, worker, Metrics("memory"), host=host).start()
    try:
        assert server.httpd.server_address[0] == host
        assert accepts("127.0.0.1", server.port)
        assert accepts("127.0.0.2", server.port) is via_other_address
    finally:
        server.stop()


def test_an_address_it_cannot_listen_on_is_a_config_error_naming_the_setting(cfg) -> None:  # noqa: F811
    worker, *_ = make_worker(cfg)
    with pytest.raises(ConfigError) as raised:
        HealthServer(0, worker, Metrics("memory"), host="192.0.2.1")  # TEST-NET: not ours
    assert "192.0.2.1" in raised.value.message
    assert "FMNIST_SERVE__METRICS_HOST" in (raised.value.hint or "")


def test_the_default_is_every_interface_and_env_restricts_it() -> None:
    assert config.load(env={}).serve.metrics_host == "0.0.0.0"
    restricted = config.load(env={"FMNIST_SERVE__METRICS_HOST": "127.0.0.1"})
    assert restricted.serve.metrics_host == "127.0.0.1"
