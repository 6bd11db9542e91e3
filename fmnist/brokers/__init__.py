"""Message brokers behind one small interface (``base.Broker``): Kafka and Google Pub/Sub.

``base.connect(name, cfg)`` imports the adapter it needs, so a command that uses one broker
never imports the other broker's client library.
"""

from fmnist.brokers.base import SUPPORTED, Broker, Consumer, Message, OutMessage, Producer, connect

__all__ = ["SUPPORTED", "Broker", "Consumer", "Message", "OutMessage", "Producer", "connect"]
