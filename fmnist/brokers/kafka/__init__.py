"""Apache Kafka behind the Broker interface, with confluent-kafka (librdkafka).

The only package that imports ``confluent_kafka``, split by concern: ``settings`` (librdkafka's
configuration from ``kafka.*``), ``errors`` (its errors as BrokerErrors that say what to do),
``broker`` (admin, topics, the Broker interface), ``producer`` and ``consumer``; ``acls``
grants a worker and a client what they need on a cluster with an authorizer
(docs/brokers.md#authenticated-kafka).

How the interface maps onto Kafka:

* a consumer *group* is a Kafka consumer group: workers sharing ``kafka.group_id`` split the
  topic's partitions; offsets are committed by hand (``commit``), never automatically, so a
  request is acknowledged only after its answer is confirmed; a new group starts at the
  earliest retained message; members rebalance cooperatively (only the partitions that move
  stop) and, with ``kafka.instance_id``, are static members
  (docs/decisions.md#cooperative-rebalancing);
* ``redeliver`` seeks each partition back to the lowest offset given, so those messages (and
  any after them) are fetched again; Kafka has no per-message acknowledgement;
* a *private reader* (no group) assigns itself every partition of the topic at offsets
  resolved when it is made (the end, or the beginning) and never commits: reading leaves
  nothing behind;
* topics we create use ``message.timestamp.type=LogAppendTime``, so a message's timestamp is
  when the broker stored it (``Message.broker_time_ms``).

Why librdkafka: fetching, batching, compression and acknowledgements run on its C threads
instead of competing with the worker's loop for the GIL (docs/decisions.md#kafka-client).

librdkafka retries and reconnects on its own; every call we make is still bounded: admin and
metadata calls by ``broker.connect_timeout_s``, a commit by the socket timeout (the same), a
``Confirmation.wait`` by the ``send``'s timeout. A rebalance never crashes a worker: commits
wait for it to end, and one the group no longer accepts is logged and dropped (the partition's
new owner delivers those messages again: at-least-once). A static member fenced out by another
with its id is the one group error that stops a worker (a ConfigError, exit 2).
"""

from fmnist.brokers.kafka.broker import KafkaBroker
from fmnist.brokers.kafka.consumer import KafkaTopicConsumer
from fmnist.brokers.kafka.settings import COMPRESSIONS

__all__ = ["COMPRESSIONS", "KafkaBroker", "KafkaTopicConsumer"]
