"""The Pub/Sub broker: its publisher and subscriber clients, topics and subscriptions, and the
Broker interface over them."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exceptions
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from fmnist.brokers.base import Consumer
from fmnist.brokers.pubsub import settings
from fmnist.brokers.pubsub.consumer import PubsubConsumer
from fmnist.brokers.pubsub.producer import PubsubProducer
from fmnist.brokers.pubsub.puller import PubsubPuller
from fmnist.config import Config
from fmnist.errors import BrokerError, ConfigError

log = logging.getLogger("fmnist.brokers.pubsub")
T = TypeVar("T")


def default_subscription(topic: str) -> str:
    """The subscription ``ensure_topics`` creates with a topic: ``<topic id>-sub``."""
    return f"{topic.rsplit('/', 1)[-1]}-sub"


class PubsubBroker:
    name = "pubsub"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.project = cfg.pubsub.project_id
        self.emulator_host = cfg.pubsub.emulator_host
        self.address = self.emulator_host or f"pubsub.googleapis.com (project {self.project})"
        self.admin_timeout_s = cfg.broker.connect_timeout_s
        self._lock = threading.Lock()
        self._publisher: Any = None
        self._subscriber: Any = None
        self._consumers: list[PubsubConsumer | PubsubPuller] = []

    # -- names and clients -------------------------------------------------------------------

    def topic_path(self, topic: str) -> str:
        return topic if topic.startswith("projects/") else f"projects/{self.project}/topics/{topic}"

    def subscription_path(self, name: str) -> str:
        return (name if name.startswith("projects/")
                else f"projects/{self.project}/subscriptions/{name}")

    def publisher(self) -> Any:
        """The one PublisherClient (topic admin and publishing), made on first use."""
        return self._client("_publisher", pubsub_v1.PublisherClient, PublisherGrpcTransport,
                            batch_settings=pubsub_v1.types.BatchSettings(max_latency=0.002,
                                                                         max_messages=500))

    def subscriber(self) -> Any:
        """The one SubscriberClient (subscription admin, streaming pulls, acks)."""
        return self._client("_subscriber", pubsub_v1.SubscriberClient, SubscriberGrpcTransport)

    def _client(self, attr: str, client_class: Callable[..., Any], transport_class: Any,
                **kwargs: Any) -> Any:
        with self._lock:
            if getattr(self, attr) is None:
                setattr(self, attr, self._make(client_class, transport_class, **kwargs))
            return getattr(self, attr)

    def _make(self, client_class: Callable[..., Any], transport_class: Any,
              **kwargs: Any) -> Any:
        try:
            if self.emulator_host:  # what PUBSUB_EMULATOR_HOST does, without the global
                # Reconnect at least every second: gRPC's backoff grows to 120 s, and after
                # an emulator restart of 10 s it first tried again 6 s after the emulator was
                # back.
                channel = grpc.insecure_channel(self.emulator_host, options=[
                    ("grpc.max_send_message_length", -1),
                    ("grpc.max_receive_message_length", -1),
                    ("grpc.max_reconnect_backoff_ms", settings.RECONNECT_MAX_MS)])
                kwargs["transport"] = transport_class(channel=channel, host=self.emulator_host)
            elif os.environ.get("PUBSUB_EMULATOR_HOST"):
                # Google's clients would follow the variable to an emulator; fmnist's
                # setting (docs/brokers.md#google-variables) says Google Cloud. A
                # transport of our own is the one thing they do not redirect.
                kwargs["transport"] = transport_class(host=settings.GOOGLE_ENDPOINT)
            return client_class(**kwargs)
        except auth_exceptions.DefaultCredentialsError as exc:
            raise BrokerError(
                f"No Google credentials for Pub/Sub project {self.project}: {exc}",
                "Run `gcloud auth application-default login` or set "
                "GOOGLE_APPLICATION_CREDENTIALS; or use the local emulator: "
                "`scripts/brokers up` and FMNIST_PUBSUB__EMULATOR_HOST=127.0.0.1:8085."
            ) from None

    def call(self, what: str, fn: Callable[..., T], timeout_s: float | None = None,
             **kwargs: Any) -> T:
        """One admin RPC, bounded by ``timeout_s``; Google API errors become BrokerError."""
        timeout_s = self.admin_timeout_s if timeout_s is None else timeout_s
        try:
            return fn(**kwargs, retry=settings.retry_policy(timeout_s), timeout=timeout_s)
        except (gexc.AlreadyExists, gexc.NotFound):
            raise
        except gexc.GoogleAPICallError as exc:
            raise self.error(what, exc) from None
        except gexc.RetryError as exc:
            raise self.error(what, exc.cause or exc) from None

    def error(self, what: str, exc: BaseException) -> BrokerError:
        reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        if isinstance(exc, (gexc.PermissionDenied, gexc.Unauthenticated)):
            return BrokerError(f"Pub/Sub at {self.address} refused to {what}: {reason}",
                               "Check the credentials and their roles on project "
                               f"{self.project} (`pubsub.project_id`).")
        if self.emulator_host:
            return BrokerError(
                f"Pub/Sub emulator at {self.emulator_host} is not reachable ({what}: {reason}).",
                "Start the local brokers with `scripts/brokers up` (or `scripts/pubsub.sh up`), "
                "or set `pubsub.emulator_host` / FMNIST_PUBSUB__EMULATOR_HOST to where it runs "
                "(empty for Google Cloud).")
        return BrokerError(f"Pub/Sub at {self.address} did not answer ({what}: {reason}).",
                           "Check the network and `pubsub.project_id`, or use the local emulator: "
                           "`scripts/brokers up` and FMNIST_PUBSUB__EMULATOR_HOST=127.0.0.1:8085.")

    # -- the Broker interface ----------------------------------------------------------------

    def check(self, timeout_s: float) -> None:
        """One bounded ListTopics call; fails at once when nothing listens at the address."""
        publisher = self.publisher()
        try:
            publisher.list_topics(request={"project": f"projects/{self.project}", "page_size": 1},
                                  retry=None, timeout=timeout_s)
        except gexc.GoogleAPICallError as exc:
            raise self.error("list topics", exc) from None

    def ensure_topics(self, topics: list[str]) -> None:
        """Create missing topics, each with its default subscription ``<topic>-sub``."""
        publisher, subscriber = self.publisher(), self.subscriber()
        for topic in topics:
            try:
                self.call(f"create topic {topic}", publisher.create_topic,
                          name=self.topic_path(topic))
                log.info("created Pub/Sub topic %s", topic)
            except gexc.AlreadyExists:
                pass
            sub_id = default_subscription(topic)
            try:
                self.call(f"create subscription {sub_id}", subscriber.create_subscription,
                          request={"name": self.subscription_path(sub_id),
                                   "topic": self.topic_path(topic),
                                   "ack_deadline_seconds": self.cfg.pubsub.ack_deadline_s})
                log.info("created Pub/Sub subscription %s", sub_id)
            except gexc.AlreadyExists:
                pass
            except gexc.NotFound:  # the topic was deleted between the two calls
                raise BrokerError(f"Pub/Sub topic {topic} vanished while creating {sub_id}.",
                                  "Run the command again.") from None

    def consumer(self, topic: str, group: str | None = None, from_beginning: bool = False,
                 max_in_flight: int = 1000, max_hold_s: float | None = None
                 ) -> PubsubConsumer | PubsubPuller:
        """A streaming-pull consumer of ``topic``; with ``max_hold_s`` and a ``group``, one that
        pulls only when it has room (``PubsubPuller``, docs/decisions.md#pubsub-jobs-pull).

        ``group``: the id (or full path) of the subscription to read, shared by every consumer
        that names it; created on ``topic`` if missing (ack deadline ``pubsub.ack_deadline_s``).
        It must belong to ``topic``. A new subscription holds only messages published after it
        was created: Pub/Sub keeps no history for it, which is why ``ensure_topics`` creates
        ``<topic>-sub`` together with the topic. ``from_beginning`` has no effect for the same
        reason; for a private reader (``group`` None) it behaves as without.

        ``max_in_flight``: how many received, not yet committed messages this consumer may hold
        (Pub/Sub flow control); the server waits with more until some are settled.
        ``max_hold_s``: how long a held message's lease is extended; such consumers hold each
        message long (a job) and pull the next only once they have room.
        """
        if group is None:
            base = topic.rsplit("/", 1)[-1][:200]
            name, private = f"{base}-reader-{uuid.uuid4().hex}", True
        else:
            name, private = group, False
        path = self.subscription_path(name)
        request: dict[str, Any] = {"name": path, "topic": self.topic_path(topic),
                                   "ack_deadline_seconds": self.cfg.pubsub.ack_deadline_s}
        if private:
            request["expiration_policy"] = {"ttl": {"seconds": settings.READER_TTL_S}}
        subscriber = self.subscriber()
        try:
            self.call(f"create subscription {name}", subscriber.create_subscription,
                      request=request)
        except gexc.AlreadyExists:
            found = self.call(f"get subscription {name}", subscriber.get_subscription,
                              subscription=path)
            if found.topic != self.topic_path(topic):
                raise ConfigError(
                    f"Pub/Sub subscription {name} reads {found.topic}, not {topic}.",
                    "Give the consumer a subscription of that topic (`pubsub.*_subscription` / "
                    "FMNIST_PUBSUB__*_SUBSCRIPTION).") from None
        except gexc.NotFound:
            raise BrokerError(f"Pub/Sub topic {topic} does not exist.",
                              "Create it first (`broker.create_topics: true` does that on "
                              "start).") from None
        consumer: PubsubConsumer | PubsubPuller
        if max_hold_s is not None and not private:
            consumer = PubsubPuller(self, topic, path, max_in_flight, max_hold_s)
        else:
            consumer = PubsubConsumer(self, topic, path, private, max_in_flight, max_hold_s)
        with self._lock:
            self._consumers = [c for c in self._consumers if not c.closed] + [consumer]
        return consumer

    def subscriptions(self, topic: str) -> list[str]:
        """The ids of the subscriptions attached to ``topic`` (for `fmnist` checks and tests)."""
        pager = self.call(f"list subscriptions of {topic}",
                          self.publisher().list_topic_subscriptions, topic=self.topic_path(topic))
        return sorted(path.rsplit("/", 1)[-1] for path in pager)

    def worker_group(self, topic: str | None = None) -> str:
        """Request workers share the subscription ``pubsub.request_subscription``; the workers
        of another topic share its default subscription ``<topic>-sub``."""
        return self.shared_subscription(topic or self.cfg.broker.request_topic)

    def retained_reader(self, topic: str, max_in_flight: int = 1000) -> Consumer:
        """Pub/Sub keeps no log: what a topic holds waits in its shared subscription (the
        configured one for the request, response and dead-letter topics, else ``<topic>-sub``)
        until a reader acknowledges it (``commit``)."""
        return self.consumer(topic, group=self.shared_subscription(topic),
                             max_in_flight=max_in_flight)

    def shared_subscription(self, topic: str) -> str:
        b, p = self.cfg.broker, self.cfg.pubsub
        return {b.request_topic: p.request_subscription, b.response_topic:
                p.response_subscription, b.dlq_topic: p.dlq_subscription}.get(
            topic, default_subscription(topic))

    def delete_topics(self, topics: list[str]) -> None:
        """Delete these topics and the subscriptions ``ensure_topics`` made for them; missing
        ones are fine."""
        subscriber, publisher = self.subscriber(), self.publisher()
        for topic in topics:
            subscription = self.subscription_path(default_subscription(topic))
            try:
                self.call(f"delete subscription of {topic}", subscriber.delete_subscription,
                          subscription=subscription)
            except gexc.NotFound:
                pass
            try:
                self.call(f"delete topic {topic}", publisher.delete_topic,
                          topic=self.topic_path(topic))
            except gexc.NotFound:
                pass

    def producer(self) -> PubsubProducer:
        return PubsubProducer(self)

    def close(self) -> None:
        """Close every consumer made here (deleting private subscriptions), then the clients."""
        with self._lock:
            consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            consumer.close()
        with self._lock:
            publisher, self._publisher = self._publisher, None
            subscriber, self._subscriber = self._subscriber, None
        if publisher is not None:
            publisher.stop()  # sends what is still batched
            publisher.transport.close()
        if subscriber is not None:
            subscriber.close()

