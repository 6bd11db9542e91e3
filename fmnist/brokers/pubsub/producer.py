"""Publishing to Pub/Sub, and waiting for the server to confirm each message."""

from __future__ import annotations

import time
from concurrent import futures
from typing import TYPE_CHECKING, Any

from google.api_core import exceptions as gexc

from fmnist.brokers.base import OutMessage
from fmnist.brokers.pubsub import settings
from fmnist.errors import BrokerError

if TYPE_CHECKING:
    from fmnist.brokers.pubsub.broker import PubsubBroker


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
                   if settings.RESERVED_ATTRIBUTES & m.headers.keys() else
                   publisher.publish(self.broker.topic_path(m.topic), m.value,
                                     retry=settings.retry_policy(timeout_s), timeout=timeout_s, **m.headers)
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
                retry=settings.retry_policy(timeout_s), timeout=timeout_s))
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

