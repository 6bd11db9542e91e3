"""Google Pub/Sub (or its local emulator) behind the Broker interface.

The only package that imports ``google.cloud.pubsub``, split by concern: ``settings`` (retry
policy and limits), ``broker`` (clients, topics and subscriptions, the Broker interface),
``producer`` and ``consumer``.

How the interface maps onto Pub/Sub:

* a topic name is a topic id in ``pubsub.project_id``; ``ensure_topics`` also creates the
  topic's default subscription ``<topic>-sub`` (``req_predict-sub``, ``res_predict-sub``, ...);
* a consumer *group* is a subscription id: workers sharing ``req_predict-sub`` split the load;
* a *private reader* (no group) is a temporary subscription ``<topic>-reader-<uuid>``, deleted
  on ``close()`` (and expired by Pub/Sub after a day unused if the process died first);
* receiving is a streaming pull into a local buffer: messages arrive while the worker is busy,
  ``next_batch`` hands out what is there, and the client library extends the ack deadline of
  every message it holds (lease management) until it is committed (ack) or redelivered (nack).

``pubsub.emulator_host`` non-empty: talk to the emulator there over an insecure channel without
credentials (what ``PUBSUB_EMULATOR_HOST`` does). Empty: Google Cloud, with the credentials the
environment provides (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud login, metadata server).
"""

from fmnist.brokers.pubsub.broker import PubsubBroker

__all__ = ["PubsubBroker"]
