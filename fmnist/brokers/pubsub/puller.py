"""A consumer that pulls only when its holder has room, for messages held a long time (jobs).

A streaming pull receives whatever the server sends. The emulator ignores the stream's flow
control, so a job worker busy with one job also received the next and held it, leased, while
another worker stood idle (docs/decisions.md#pubsub-jobs-pull). Here each ``next_batch`` is one
unary Pull for at most the room left, so a busy holder has nothing else in hand; its own thread
extends the leases of what it holds, a third of the ack deadline at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from google.api_core import exceptions as gexc

from fmnist.brokers.base import Message
from fmnist.brokers.pubsub import settings
from fmnist.brokers.pubsub.consumer import message_of
from fmnist.errors import BrokerError

if TYPE_CHECKING:
    from fmnist.brokers.pubsub.broker import PubsubBroker

log = logging.getLogger("fmnist.brokers.pubsub")
# One Pull waits at most this long for a message: next_batch's timeout is honoured in slices.
PULL_SLICE_S = 1.0
# After an empty Pull: an idle holder asks 4 times a second, and a job waits at most this long
# more for a free worker.
EMPTY_PULL_PAUSE_S = 0.25


class PubsubPuller:
    """Unary pulls of one shared subscription; what is held is leased until settled."""

    def __init__(self, broker: PubsubBroker, topic: str, subscription: str, max_in_flight: int,
                 max_hold_s: float) -> None:
        self.broker, self.topic, self.subscription = broker, topic, subscription
        self.max_in_flight, self.max_hold_s = max(1, max_in_flight), max_hold_s
        self.closed = False
        self._client = broker.subscriber()
        self._held: dict[str, float] = {}  # ack_id -> when it was pulled (monotonic)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._deadline_s = broker.cfg.pubsub.ack_deadline_s
        self._leaser = threading.Thread(target=self._extend_leases, daemon=True,
                                        name="fmnist-pubsub-lease")
        self._leaser.start()

    def next_batch(self, max_messages: int, timeout_s: float) -> list[Message]:
        """What a Pull brings, up to the room left, pulling again until ``timeout_s`` passes;
        nothing when this consumer already holds ``max_in_flight``."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            with self._lock:
                room = min(max_messages, self.max_in_flight - len(self._held))
            if room <= 0 or self.closed:
                self._stopped.wait(max(0.0, deadline - time.monotonic()))
                return []
            if received := self._pull(room, deadline):
                break
            left = deadline - time.monotonic()
            # An empty Pull returns at once (the emulator's does): pause before the next
            if left <= 0 or self._stopped.wait(min(EMPTY_PULL_PAUSE_S, left)):
                return []
        now, pulled = time.time(), time.monotonic()
        with self._lock:
            self._held.update((r.ack_id, pulled) for r in received)
        return [message_of(r.message, r.ack_id, self.topic, now) for r in received]

    def _pull(self, room: int, deadline: float) -> list[Any]:
        try:
            response = self._client.pull(
                subscription=self.subscription, max_messages=room, retry=None,
                timeout=min(max(deadline - time.monotonic(), 0.1), PULL_SLICE_S))
        except gexc.DeadlineExceeded:  # nothing arrived in time
            return []
        except gexc.NotFound:
            raise BrokerError(f"Pub/Sub subscription {self.subscription} no longer exists.",
                              "It was deleted, or the emulator restarted; start the consumer "
                              "again.") from None
        except gexc.GoogleAPICallError as exc:
            raise self.broker.error(f"pull from {self.subscription}", exc) from None
        return list(response.received_messages)

    def commit(self, messages: list[Message]) -> None:
        ack_ids = self._release(messages)
        if ack_ids:
            self.broker.call(f"acknowledge on {self.subscription}", self._client.acknowledge,
                             subscription=self.subscription, ack_ids=ack_ids)

    def redeliver(self, messages: list[Message]) -> None:
        """An ack deadline of 0: Pub/Sub delivers them again at once."""
        ack_ids = self._release(messages)
        if ack_ids:
            self._modify(ack_ids, 0, "nack")

    def _release(self, messages: list[Message]) -> list[str]:
        ack_ids = [m.handle for m in messages]
        with self._lock:
            for ack_id in ack_ids:
                self._held.pop(ack_id, None)
        return ack_ids

    def _modify(self, ack_ids: list[str], seconds: int, what: str) -> None:
        self.broker.call(f"{what} on {self.subscription}", self._client.modify_ack_deadline,
                         subscription=self.subscription, ack_ids=ack_ids,
                         ack_deadline_seconds=seconds)

    def _extend_leases(self) -> None:
        """Every third of the ack deadline, extend what is held by a whole deadline: two
        thirds of it to spare on a loaded machine. A message held longer than ``max_hold_s``
        is let go, and Pub/Sub delivers it again."""
        every = max(1.0, self._deadline_s / 3)
        while not self._stopped.wait(every):
            cutoff = time.monotonic() - self.max_hold_s
            with self._lock:
                expired = [a for a, since in self._held.items() if since < cutoff]
                for ack_id in expired:
                    del self._held[ack_id]
                held = list(self._held)
            if expired:
                log.warning("let go of %d message(s) held over %.0f s on %s", len(expired),
                            self.max_hold_s, self.subscription)
            if not held:
                continue
            try:
                self._modify(held, self._deadline_s, "extend the leases")
            except BrokerError as exc:  # the next Pull or commit reports the outage
                log.warning("%s", exc.message)

    def close(self) -> None:
        """Stop extending; give back what was held and not committed."""
        if self.closed:
            return
        self.closed = True
        self._stopped.set()
        self._leaser.join(timeout=settings.CLOSE_TIMEOUT_S)
        with self._lock:
            held, self._held = list(self._held), {}
        if held:
            try:
                self._modify(held, 0, "give back")
            except BrokerError as exc:
                log.warning("could not give back %d message(s): %s", len(held), exc.message)

