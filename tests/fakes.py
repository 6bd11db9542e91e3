"""In-memory doubles for unit tests of logic. Integration tests use the real brokers."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fmnist.brokers.base import Message, OutMessage
from fmnist.data import CLASS_NAMES
from fmnist.errors import BrokerError
from fmnist.model.predictor import Prediction


@dataclass
class MemoryBroker:
    """Topics are lists; a group is a committed offset per topic (one partition)."""

    name: str = "memory"
    address: str = "memory"
    topics: dict[str, list[OutMessage]] = field(default_factory=dict)
    committed: dict[tuple[str, str], int] = field(default_factory=dict)
    fail_publishes: int = 0  # the next N sends fail: their wait() raises BrokerError
    fail_commits: int = 0  # the next N commits raise BrokerError

    def check(self, timeout_s: float) -> None: ...

    def ensure_topics(self, topics: list[str]) -> None:
        for topic in topics:
            self.topics.setdefault(topic, [])

    def consumer(self, topic: str, group: str | None = None, from_beginning: bool = False,
                 max_in_flight: int = 1000, max_hold_s: float | None = None) -> MemoryConsumer:
        self.ensure_topics([topic])
        start = self.committed.get((topic, group), 0) if group else (
            0 if from_beginning else len(self.topics[topic]))
        return MemoryConsumer(self, topic, group, start)

    def producer(self) -> MemoryProducer:
        return MemoryProducer(self)

    def worker_group(self, topic: str | None = None) -> str:
        return "workers" if topic is None else f"workers.{topic}"

    def retained_reader(self, topic: str, max_in_flight: int = 1000) -> MemoryConsumer:
        return self.consumer(topic, from_beginning=True)

    def delete_topics(self, topics: list[str]) -> None:
        for topic in topics:
            self.topics.pop(topic, None)

    def close(self) -> None: ...


@dataclass
class MemoryConsumer:
    broker: MemoryBroker
    topic: str
    group: str | None
    position: int

    def next_batch(self, max_messages: int, timeout_s: float) -> list[Message]:
        log = self.broker.topics[self.topic]
        out = []
        for offset in range(self.position, min(len(log), self.position + max_messages)):
            m = log[offset]
            out.append(Message(m.value, dict(m.headers), m.key, self.topic,
                               f"{self.topic}/0/{offset}", None, time.time(), handle=offset))
        self.position += len(out)
        return out

    def commit(self, messages: list[Message]) -> None:
        if self.broker.fail_commits:
            self.broker.fail_commits -= 1
            raise BrokerError("commit failed (injected)")
        if self.group and messages:
            key = (self.topic, self.group)
            self.broker.committed[key] = max(self.broker.committed.get(key, 0),
                                             max(m.handle for m in messages) + 1)

    def redeliver(self, messages: list[Message]) -> None:
        if messages:
            self.position = min(m.handle for m in messages)

    def close(self) -> None: ...


@dataclass
class MemoryProducer:
    broker: MemoryBroker

    def send(self, messages: list[OutMessage], timeout_s: float) -> MemoryConfirmation:
        """Delivers at once, or (``fail_publishes``) not at all: then ``wait`` raises, as a
        real client reports a failed send on its future, not when it is queued."""
        if self.broker.fail_publishes:
            self.broker.fail_publishes -= 1
            return MemoryConfirmation(BrokerError("publish failed (injected)"))
        for m in messages:
            self.broker.topics.setdefault(m.topic, []).append(m)
        return MemoryConfirmation(None)

    def publish(self, messages: list[OutMessage], timeout_s: float) -> None:
        self.send(messages, timeout_s).wait()

    def close(self) -> None: ...


@dataclass
class MemoryConfirmation:
    error: BrokerError | None

    def wait(self) -> None:
        if self.error is not None:
            raise self.error


class BrightnessPredictor:
    """Label = brightest pixel // 25: lets a test tell which image an answer belongs to."""

    name = "fake"
    version = "000000000000"

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.batches: list[int] = []

    def start(self, pixels: np.ndarray) -> Callable[[], np.ndarray]:
        """A failure surfaces in ``collect()``, as JAX reports it there."""
        self.batches.append(len(pixels))
        return lambda: self._brightness(pixels)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        return self.start(pixels)()

    def _brightness(self, pixels: np.ndarray) -> np.ndarray:
        if self.fail:
            raise RuntimeError("model exploded")
        probs = np.full((len(pixels), 10), 0.1 / 9, np.float32)
        for row, image in zip(probs, pixels, strict=True):
            row[min(int(image.max()) // 25, 9)] = 0.9
        return probs

    def describe(self, probs: np.ndarray) -> Prediction:
        label = int(probs.argmax())
        return Prediction(label, CLASS_NAMES[label], float(probs[label]),
                          [{"label": label, "class_name": CLASS_NAMES[label],
                            "probability": float(probs[label])}])

    def describe_many(self, probs: np.ndarray) -> list[Prediction]:
        return [self.describe(row) for row in probs]
