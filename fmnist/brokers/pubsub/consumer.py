"""A streaming-pull consumer of one Pub/Sub subscription, shared (a group) or private."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler

from fmnist.brokers.base import Message
from fmnist.brokers.pubsub import settings
from fmnist.errors import BrokerError

if TYPE_CHECKING:
    from fmnist.brokers.pubsub.broker import PubsubBroker

log = logging.getLogger("fmnist.brokers.pubsub")
VERIFY_EVERY_S = 1.0  # how often a consumer back from an outage asks for its subscription


class PubsubConsumer:
    """A streaming pull feeding a local buffer that ``next_batch`` drains."""

    def __init__(self, broker: PubsubBroker, topic: str, subscription: str, private: bool,
                 max_in_flight: int, max_hold_s: float | None = None) -> None:
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
                **({} if max_hold_s is None else {"max_lease_duration": max_hold_s}),
                max_duration_per_lease_extension=broker.cfg.pubsub.ack_deadline_s),
            scheduler=ThreadScheduler(executor=self._executor))
        self._stream.add_done_callback(lambda _: self._wake())
        self._outage: str | None = None  # see ``outage``
        self._gone = False  # the server answered that the subscription no longer exists
        self._verifying = False
        self._stopped = threading.Event()  # set by close: ends a verification under way
        self._channel: Any = None
        if not private:  # a worker: it watches its connection (``outage``)
            self._channel = getattr(self._client.transport, "grpc_channel", None)
            if self._channel is not None:
                self._channel.subscribe(self._connectivity, try_to_connect=False)

    def outage(self) -> str | None:
        """Why this consumer cannot receive requests now, or None.

        The streaming pull retries an unreachable server for ever, so nothing fails while
        Pub/Sub is away; the gRPC channel's connectivity says so instead: a failed connection
        (TRANSIENT_FAILURE) is an outage. A connection that is back is not enough: an emulator
        that restarted has forgotten every subscription, and a request published before the
        worker has made its subscription again would be dropped. So once the channel is READY
        again the outage lasts until a GetSubscription answers (every ``VERIFY_EVERY_S``); when
        the subscription is gone, ``next_batch`` fails (``_gone``) and the worker makes a new
        consumer, and the topic and subscription with it.
        """
        if self._stream.done() and not self.closed:
            return f"the streaming pull from {self.subscription} stopped"
        return self._outage

    def _connectivity(self, state: grpc.ChannelConnectivity) -> None:
        """gRPC's connectivity callback (its own thread)."""
        if self.closed:
            return
        if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            self._outage = f"Pub/Sub at {self.broker.address} is not reachable"
        elif state is grpc.ChannelConnectivity.READY and self._outage is not None:
            with self._ready:
                if self._verifying:
                    return
                self._verifying = True
            threading.Thread(target=self._verify, name="fmnist-pubsub-verify",
                             daemon=True).start()

    def _verify(self) -> None:
        try:
            while self._outage is not None and not self._stopped.is_set():
                try:
                    self._client.get_subscription(subscription=self.subscription, retry=None,
                                                  timeout=2 * VERIFY_EVERY_S)
                except gexc.NotFound:
                    # The stream would fail too, but only when the client library reopens it,
                    # which it throttles to 5 times in 10 s: after an outage it used them up
                    # and the worker waited up to 10 s more. Failing ``next_batch`` now makes
                    # the worker reconnect (and create the subscription again) at once.
                    self._outage = f"Pub/Sub subscription {self.subscription} no longer exists"
                    self._gone = True
                    self._wake()
                    return
                except (gexc.GoogleAPICallError, gexc.RetryError):
                    self._stopped.wait(VERIFY_EVERY_S)
                    continue
                self._outage = None
        finally:
            with self._ready:
                self._verifying = False

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
            while (not self._buffer and not self.closed and not self._stream.done()
                   and not self._gone):
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
        return [message_of(raw, raw, self.topic, now) for raw in taken]

    def _raise_if_broken(self) -> None:
        if self._gone and not self.closed:
            raise BrokerError(f"Pub/Sub subscription {self.subscription} no longer exists.",
                              "It was deleted, or the emulator restarted; start the consumer "
                              "again.")
        if self.closed or not self._stream.done():
            return
        exc = self._stream.exception()
        if isinstance(exc, gexc.NotFound):
            raise BrokerError(f"Pub/Sub subscription {self.subscription} no longer exists.",
                              "It was deleted while we read it; start the consumer again.")
        raise self.broker.error(f"pull from {self.subscription}",
                                exc or RuntimeError("the stream stopped"))

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
        self._stopped.set()
        if self._channel is not None:
            self._channel.unsubscribe(self._connectivity)
        self._stream.cancel()
        try:
            # A subscription that is gone delivers nothing more, and a stream waiting out the
            # client library's reopen throttle would hold this wait its whole length.
            if not self._gone:
                self._stream.result(timeout=settings.CLOSE_TIMEOUT_S)
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
                                                 timeout=settings.CLOSE_TIMEOUT_S)
            elif unsettled:  # a deadline of 0 is a nack; the stream that could send one is gone
                self._client.modify_ack_deadline(subscription=self.subscription,
                                                 ack_ids=unsettled, ack_deadline_seconds=0,
                                                 retry=None, timeout=settings.CLOSE_TIMEOUT_S)
        except gexc.NotFound:
            pass
        except gexc.GoogleAPICallError as exc:
            log.warning("could not %s on close (%s)", "delete Pub/Sub subscription "
                        f"{self.subscription}; it expires unused after a day" if self.private
                        else f"give back {len(unsettled)} message(s)", exc)


def message_of(raw: Any, handle: Any, topic: str, now: float) -> Message:
    """Ours, of a Pub/Sub message: the streaming pull's (``handle`` is the message itself) or a
    unary Pull's (``handle`` is its ack id); both have the fields read here."""
    published = raw.publish_time
    return Message(value=bytes(raw.data), headers=dict(raw.attributes),
                   key=raw.ordering_key or None, topic=topic, source_id=raw.message_id,
                   broker_time_ms=int(published.timestamp() * 1000) if published else None,
                   received_at=now, handle=handle)
