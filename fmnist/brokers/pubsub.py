"""Google Pub/Sub (or its local emulator) behind the Broker interface.

The only module that imports ``google.cloud.pubsub``. How the interface maps onto Pub/Sub:

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

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any, TypeVar

import grpc
from google.api_core import exceptions as gexc
from google.api_core import retry as gretry
from google.auth import exceptions as auth_exceptions
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from fmnist.brokers.base import Message, OutMessage
from fmnist.config import Config
from fmnist.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
READER_TTL_S = 24 * 3600  # the shortest expiration Pub/Sub accepts
CLOSE_TIMEOUT_S = 5.0
_RETRYABLE = (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.Aborted,
              gexc.InternalServerError, gexc.ResourceExhausted, gexc.Unknown)
# Keyword names of PublisherClient.publish: an attribute with one of these names cannot be sent
# through it (PubsubProducer._direct sends such messages).
_RESERVED_ATTRIBUTES = frozenset({"topic", "data", "ordering_key", "retry", "timeout"})


def _retry(timeout_s: float) -> gretry.Retry:
    """Retry transient errors, but never past ``timeout_s`` in total."""
    return gretry.Retry(predicate=gretry.if_exception_type(*_RETRYABLE), initial=0.05,
                        maximum=1.0, multiplier=2.0, timeout=timeout_s)


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
        self._consumers: list[PubsubConsumer] = []

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
                if self.emulator_host:  # what PUBSUB_EMULATOR_HOST does, without the global
                    channel = grpc.insecure_channel(self.emulator_host, options=[
                        ("grpc.max_send_message_length", -1),
                        ("grpc.max_receive_message_length", -1)])
                    kwargs["transport"] = transport_class(channel=channel,
                                                          host=self.emulator_host)
                try:
                    setattr(self, attr, client_class(**kwargs))
                except auth_exceptions.DefaultCredentialsError as exc:
                    raise BrokerError(
                        f"No Google credentials for Pub/Sub project {self.project}: {exc}",
                        "Run `gcloud auth application-default login` or set "
                        "GOOGLE_APPLICATION_CREDENTIALS; or use the local emulator: "
                        "`scripts/brokers up` and FMNIST_PUBSUB__EMULATOR_HOST=127.0.0.1:8085."
                    ) from None
            return getattr(self, attr)

    def call(self, what: str, fn: Callable[..., T], timeout_s: float | None = None,
             **kwargs: Any) -> T:
        """One admin RPC, bounded by ``timeout_s``; Google API errors become BrokerError."""
        timeout_s = self.admin_timeout_s if timeout_s is None else timeout_s
        try:
            return fn(**kwargs, retry=_retry(timeout_s), timeout=timeout_s)
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
            sub_id = f"{topic.rsplit('/', 1)[-1]}-sub"
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
                 max_in_flight: int = 1000) -> PubsubConsumer:
        """A streaming-pull consumer of ``topic``.

        ``group``: the id (or full path) of the subscription to read, shared by every consumer
        that names it; created on ``topic`` if missing (ack deadline ``pubsub.ack_deadline_s``).
        It must belong to ``topic``. A new subscription holds only messages published after it
        was created: Pub/Sub keeps no history for it, which is why ``ensure_topics`` creates
        ``<topic>-sub`` together with the topic. ``from_beginning`` has no effect for the same
        reason; for a private reader (``group`` None) it behaves as without.

        ``max_in_flight``: how many received, not yet committed messages this consumer may hold
        (Pub/Sub flow control); the server waits with more until some are settled.
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
            request["expiration_policy"] = {"ttl": {"seconds": READER_TTL_S}}
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
        consumer = PubsubConsumer(self, topic, path, private, max_in_flight)
        with self._lock:
            self._consumers = [c for c in self._consumers if not c.closed] + [consumer]
        return consumer

    def subscriptions(self, topic: str) -> list[str]:
        """The ids of the subscriptions attached to ``topic`` (for `fmnist` checks and tests)."""
        pager = self.call(f"list subscriptions of {topic}",
                          self.publisher().list_topic_subscriptions, topic=self.topic_path(topic))
        return sorted(path.rsplit("/", 1)[-1] for path in pager)

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


class PubsubProducer:
    """Publishes through the broker's shared PublisherClient (batches for at most 2 ms)."""

    def __init__(self, broker: PubsubBroker) -> None:
        self.broker = broker

    def send(self, messages: list[OutMessage], timeout_s: float) -> PubsubConfirmation:
        """Hand all to the publisher client (it batches for up to 2 ms); ``wait`` checks each.

        ``key`` is not sent (no ordering keys: they serialize a key's messages); headers become
        attributes.
        """
        publisher = self.broker.publisher()
        deadline = time.monotonic() + timeout_s
        pending = [self._direct(publisher, m, timeout_s)
                   if _RESERVED_ATTRIBUTES & m.headers.keys() else
                   publisher.publish(self.broker.topic_path(m.topic), m.value,
                                     retry=_retry(timeout_s), timeout=timeout_s, **m.headers)
                   for m in messages]
        return PubsubConfirmation(self.broker, list(zip(messages, pending, strict=True)),
                                  timeout_s, deadline)

    def publish(self, messages: list[OutMessage], timeout_s: float) -> None:
        self.send(messages, timeout_s).wait()

    def _direct(self, publisher: Any, m: OutMessage, timeout_s: float) -> futures.Future[Any]:
        """One unbatched Publish RPC, for a message with an attribute named like a keyword of
        the client's ``publish()`` (``topic``, ``data``, ...), which that call cannot take. Other
        clients may send such attributes; a dead letter copies them and must still go out."""
        done: futures.Future[Any] = futures.Future()
        try:
            done.set_result(publisher.api.publish(
                topic=self.broker.topic_path(m.topic),
                messages=[{"data": m.value, "attributes": m.headers}],
                retry=_retry(timeout_s), timeout=timeout_s))
        except Exception as exc:  # reported with the others, below
            done.set_exception(exc)
        return done

    def close(self) -> None:
        """Nothing to release: the client belongs to the broker and closes with it."""


class PubsubConfirmation:
    """The futures of one ``send``; ``wait`` checks every one."""

    def __init__(self, broker: PubsubBroker, sent: list[tuple[OutMessage, futures.Future[Any]]],
                 timeout_s: float, deadline: float) -> None:
        self.broker, self.sent, self.timeout_s, self.deadline = broker, sent, timeout_s, deadline

    def wait(self) -> None:
        failed: list[tuple[OutMessage, BaseException]] = []
        for message, future in self.sent:
            try:
                future.result(timeout=max(0.0, self.deadline - time.monotonic()))
            except Exception as exc:  # a timeout, or the RPC's error the future carries
                failed.append((message, exc))
        if not failed:
            return
        message, first_error = failed[0]
        count = f"{len(failed)} of {len(self.sent)} message(s)"
        if isinstance(first_error, futures.TimeoutError):
            raise BrokerError(
                f"Pub/Sub at {self.broker.address} did not confirm {count} within "
                f"{self.timeout_s:g} s.",
                "Is the broker up? `scripts/brokers up` starts the local emulator.")
        if isinstance(first_error, gexc.NotFound):
            raise BrokerError(f"Pub/Sub topic {message.topic} does not exist ({count} not sent).",
                              "Create it first (`broker.create_topics: true`).")
        raise self.broker.error(f"publish {count} to {message.topic}", first_error)


class PubsubConsumer:
    """A streaming pull feeding a local buffer that ``next_batch`` drains."""

    def __init__(self, broker: PubsubBroker, topic: str, subscription: str, private: bool,
                 max_in_flight: int) -> None:
        self.broker = broker
        self.topic = topic
        self.subscription = subscription
        self.private = private
        self.closed = False
        self._ready = threading.Condition()
        self._buffer: deque[Any] = deque()  # vendor messages, oldest first
        self._handed_out: dict[str, Any] = {}  # ack_id -> vendor message, not yet settled
        self._client = broker.subscriber()
        self._executor = futures.ThreadPoolExecutor(max_workers=2,
                                                    thread_name_prefix="fmnist-pubsub")
        self._stream = self._client.subscribe(
            subscription, callback=self._arrived,
            # The stream's ack deadline is pubsub.ack_deadline_s, not the client library's 60 s
            # default: what a worker killed with messages in hand holds up that long.
            flow_control=pubsub_v1.types.FlowControl(
                max_messages=max_in_flight,
                max_duration_per_lease_extension=broker.cfg.pubsub.ack_deadline_s),
            scheduler=ThreadScheduler(executor=self._executor))
        self._stream.add_done_callback(lambda _: self._wake())

    def _arrived(self, message: Any) -> None:
        with self._ready:
            self._buffer.append(message)
            self._ready.notify()

    def _wake(self) -> None:
        with self._ready:
            self._ready.notify_all()

    def next_batch(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Whatever is buffered (up to ``max_messages``), waiting up to ``timeout_s`` for one.

        A private reader acknowledges what it hands out: nobody else reads its subscription,
        and unacknowledged messages would use up its flow control.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._ready:
            while not self._buffer and not self.closed and not self._stream.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(left)
            taken = [self._buffer.popleft() for _ in range(min(max_messages, len(self._buffer)))]
            if not taken:
                self._raise_if_broken()
            if not self.private:
                self._handed_out.update((raw.ack_id, raw) for raw in taken)
        now = time.time()
        if self.private:
            for raw in taken:
                raw.ack()
        return [self._convert(raw, now) for raw in taken]

    def _raise_if_broken(self) -> None:
        if self.closed or not self._stream.done():
            return
        exc = self._stream.exception()
        if isinstance(exc, gexc.NotFound):
            raise BrokerError(f"Pub/Sub subscription {self.subscription} no longer exists.",
                              "It was deleted while we read it; start the consumer again.")
        raise self.broker.error(f"pull from {self.subscription}",
                                exc or RuntimeError("the stream stopped"))

    def _convert(self, raw: Any, now: float) -> Message:
        published = raw.publish_time
        return Message(value=bytes(raw.data), headers=dict(raw.attributes),
                       key=raw.ordering_key or None, topic=self.topic, source_id=raw.message_id,
                       broker_time_ms=int(published.timestamp() * 1000) if published else None,
                       received_at=now, handle=raw)

    def commit(self, messages: list[Message]) -> None:
        """Acknowledge, and wait (bounded) until Pub/Sub has taken the acks."""
        if self.private:
            return  # acknowledged when handed out
        self._settle(messages, "acknowledge", lambda raw: raw.ack_with_response())

    def redeliver(self, messages: list[Message]) -> None:
        """Nack: Pub/Sub delivers them again at once, to this or another consumer of the group.

        A private reader (already acknowledged) puts them back at the front of its buffer.
        """
        if self.private:
            with self._ready:
                self._buffer.extendleft(reversed([m.handle for m in messages]))
                self._ready.notify_all()
            return
        self._settle(messages, "nack", lambda raw: raw.nack_with_response())

    def _settle(self, messages: Iterable[Message], what: str,
                send: Callable[[Any], futures.Future[Any]]) -> None:
        raws = [m.handle for m in messages]
        with self._ready:
            for raw in raws:
                self._handed_out.pop(raw.ack_id, None)
        pending = [send(raw) for raw in raws]
        deadline = time.monotonic() + self.broker.admin_timeout_s
        for future in pending:
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except futures.TimeoutError:
                raise BrokerError(f"Pub/Sub at {self.broker.address} did not take the {what} "
                                  f"within {self.broker.admin_timeout_s:g} s.",
                                  "The messages will be delivered again after their ack "
                                  "deadline.") from None
            except Exception as exc:  # AcknowledgeError (exactly-once subscriptions only)
                raise self.broker.error(f"{what} on {self.subscription}", exc) from None

    def close(self) -> None:
        """Stop the stream; give back what was not committed; delete a private subscription.

        Messages handed out and not yet committed are nacked here, so the group gets them again
        at once instead of after their ack deadline; commit before closing what was answered.
        """
        if self.closed:
            return
        with self._ready:
            self.closed = True
            self._ready.notify_all()
        self._stream.cancel()
        try:
            self._stream.result(timeout=CLOSE_TIMEOUT_S)
        except Exception as exc:  # a broken stream: nothing left to stop
            log.debug("streaming pull on %s ended with %r", self.subscription, exc)
        self._executor.shutdown(wait=False)
        with self._ready:  # the stream is stopped: nothing arrives any more
            unsettled = [raw.ack_id for raw in self._buffer] + list(self._handed_out)
            self._buffer.clear()
            self._handed_out.clear()
        try:
            if self.private:
                self._client.delete_subscription(subscription=self.subscription, retry=None,
                                                 timeout=CLOSE_TIMEOUT_S)
            elif unsettled:  # a deadline of 0 is a nack; the stream that could send one is gone
                self._client.modify_ack_deadline(subscription=self.subscription,
                                                 ack_ids=unsettled, ack_deadline_seconds=0,
                                                 retry=None, timeout=CLOSE_TIMEOUT_S)
        except gexc.NotFound:
            pass
        except gexc.GoogleAPICallError as exc:
            log.warning("could not %s on close (%s)", "delete Pub/Sub subscription "
                        f"{self.subscription}; it expires unused after a day" if self.private
                        else f"give back {len(unsettled)} message(s)", exc)
