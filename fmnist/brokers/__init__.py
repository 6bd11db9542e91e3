"""Message brokers behind one small interface (``base.Broker``): Kafka and Google Pub/Sub.

The registry below maps a broker's name to its adapter, imported only when that broker is
used: a command that talks to one broker never imports the other's client library, and
``fmnist --help`` imports neither. A new broker is one adapter package and one line here.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from fmnist.brokers.base import Broker, Consumer, LagReporting, Message, OutMessage, Producer

if TYPE_CHECKING:
    from fmnist.config import Config

# name -> "module:class" of its adapter
ADAPTERS = {
    "kafka": "fmnist.brokers.kafka:KafkaBroker",
    "pubsub": "fmnist.brokers.pubsub:PubsubBroker",
}
SUPPORTED = tuple(ADAPTERS)


def connect(name: str, cfg: Config) -> Broker:
    """The broker named ``name``, configured from the shared Config."""
    if name not in ADAPTERS:
        from fmnist.errors import ConfigError

        raise ConfigError(f"Unknown broker {name!r}.", f"Use one of: {', '.join(SUPPORTED)}.")
    module, _, cls = ADAPTERS[name].partition(":")
    adapter: Broker = getattr(import_module(module), cls)(cfg)
    return adapter


__all__ = ["ADAPTERS", "SUPPORTED", "Broker", "Consumer", "LagReporting", "Message",
           "OutMessage", "Producer", "connect"]
