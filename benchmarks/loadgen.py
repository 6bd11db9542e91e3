"""The load generator: publish real PNG requests, match answers by request_id, time them.

Built on the same broker adapters (``fmnist.brokers``) as ``fmnist send --wait``: the private
reader of the response topic is opened *before* anything is published, requests carry
``request_id``, ``content_type`` and ``sent_at`` headers, and answers are matched (and
de-duplicated) by their ``request_id`` header. A receiver thread reads answers while the main
thread publishes, so the pacing is open loop: the next request leaves on schedule whether or not
earlier ones were answered, and latency is measured from each request's *scheduled* send time
(a publisher that falls behind shows up as latency, not as a slower offered rate).

By default the requests are the PNGs of ``Images/`` in turn; a ``Payload`` sends one fixed body
instead (benchmarks/peers.py: the same Open Inference Protocol JSON to fmnist and its peers),
with extra headers, and says which bytes mark an answer as a prediction.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from common import ROOT, Topics, percentiles

from fmnist.brokers import Broker, Message, OutMessage, connect
from fmnist.serving import protocol

PUBLISH_CHUNK = 1000
SUSTAINED_FRACTION = 0.9  # answers must keep up with at least 90% of the offered rate
LOADGEN_LAG_S = 0.25  # the publisher itself ended this far behind schedule: it was the limit


@dataclass(frozen=True)
class Payload:
    """One request body sent every time, its content type, headers added to fmnist's own, and
    the bytes whose presence in an answer makes it a prediction."""

    body: bytes
    content_type: str
    headers: dict[str, str]
    ok_marker: bytes


@dataclass
class Phase:
    """Request ids of one phase, when each was meant to leave, when publishing ended."""

    rids: list[str]
    scheduled: list[float]
    started: float
    published: float


class LoadGen:
    def __init__(self, broker_name: str, topics: Topics, overrides: dict[str, str],
                 payload: Payload | None = None) -> None:
        self.topics = topics
        self.payload = payload
        cfg = topics.config(overrides, inherit=True)
        self.broker = connect(broker_name, cfg)
        self.broker.check(cfg.broker.connect_timeout_s)
        self.broker.ensure_topics(topics.all())
        self.reader = self.broker.consumer(topics.response, group=None)  # before any request
        self.producer = self.broker.producer()
        self.payloads = [p.read_bytes() for p in sorted((ROOT / "Images").glob("*.png"))]
        self.answers: dict[str, Message] = {}
        self.duplicates = 0
        self._sent = 0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._receive, name="bench-receiver", daemon=True)
        self._thread.start()

    # -- receiving ------------------------------------------------------------------------------

    def _receive(self) -> None:
        try:
            while not self._stop.is_set():
                for m in self.reader.next_batch(500, timeout_s=0.05):
                    rid = m.headers.get(protocol.REQUEST_ID) or m.key
                    if rid in self.answers:
                        self.duplicates += 1
                    else:
                        self.answers[rid] = m
        except BaseException as exc:  # surfaced by wait_for
            self._error = exc

    def wait_for(self, rids: list[str], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        pending = [r for r in rids if r not in self.answers]
        while pending:
            if self._error is not None:
                raise self._error
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
            pending = [r for r in pending if r not in self.answers]
        return True

    def worker_id(self, rid: str) -> str | None:
        m = self.answers[rid]
        if "worker_id" in m.headers:  # the echo worker says it in a header
            return m.headers["worker_id"]
        try:
            return json.loads(m.value).get("worker_id")
        except ValueError:
            return None

    def ok(self, rid: str) -> bool:
        """An answer that is a prediction (fmnist) or the request's own bytes (echo)."""
        m = self.answers[rid]
        if self.payload is not None:
            return self.payload.ok_marker in m.value
        return "worker_id" in m.headers or b'"status":"ok"' in m.value

    # -- publishing -----------------------------------------------------------------------------

    def _messages(self, count: int) -> list[OutMessage]:
        out = []
        for _ in range(count):
            rid = protocol.new_request_id()
            if self.payload is None:
                body = self.payloads[self._sent % len(self.payloads)]
                headers = protocol.request_headers(rid, "image/png")
            else:
                body = self.payload.body
                headers = {**protocol.request_headers(rid, self.payload.content_type),
                           **self.payload.headers}
            self._sent += 1
            out.append(OutMessage(self.topics.request, body, key=rid, headers=headers))
        return out

    def send(self, count: int, timeout_s: float = 30) -> list[str]:
        messages = self._messages(count)
        for start in range(0, count, PUBLISH_CHUNK):
            self.producer.publish(messages[start:start + PUBLISH_CHUNK], timeout_s=timeout_s)
        return [m.key for m in messages]  # type: ignore[misc]

    def ready(self, workers: int, timeout_s: float) -> set[str]:
        """Send small rounds until ``workers`` distinct workers have answered (all joined)."""
        seen: set[str] = set()
        deadline = time.monotonic() + timeout_s
        while len(seen) < workers and time.monotonic() < deadline:
            rids = self.send(8)
            self.wait_for(rids, 2.0)
            seen |= {w for r in rids if r in self.answers and (w := self.worker_id(r))}
        return seen

    # -- measurements ---------------------------------------------------------------------------

    def burst(self, count: int, timeout_s: float) -> dict[str, Any]:
        """Publish ``count`` requests as fast as the client allows; answered/s at saturation."""
        started = time.time()
        rids = self.send(count, timeout_s=timeout_s)
        published = time.time()
        self.wait_for(rids, timeout_s)
        times = sorted(self.answers[r].received_at for r in rids if r in self.answers)
        answered = len(times)
        out: dict[str, Any] = {"requests": count, "answered": answered,
                               "ok": sum(self.ok(r) for r in rids if r in self.answers),
                               "published_per_s": count / max(published - started, 1e-9)}
        if answered >= 10:
            out["answered_per_s"] = answered / max(times[-1] - started, 1e-9)
            lo, hi = times[answered // 10], times[answered * 9 // 10]
            out["steady_answered_per_s"] = (answered * 9 // 10 - answered // 10) / max(hi - lo, 1e-9)
        return out

    def send_paced(self, rate: float, seconds: float) -> Phase:
        """Open loop: request i leaves at start + i/rate, whatever happened to the others."""
        count = max(1, int(rate * seconds))
        started = time.time() + 0.05
        scheduled = [started + i / rate for i in range(count)]
        rids: list[str] = []
        while len(rids) < count:
            now = time.time()
            due = min(count, int((now - started) * rate) + 1) if now >= started else 0
            if due > len(rids):
                rids += self.send(due - len(rids))
            else:
                time.sleep(max(0.0, min(scheduled[len(rids)] - time.time(), 0.005)))
        return Phase(rids, scheduled, started, time.time())

    def paced(self, rate: float, seconds: float, drain_s: float = 10.0) -> dict[str, Any]:
        """``send_paced``, then latency from each request's scheduled time to its answer."""
        phase = self.send_paced(rate, seconds)
        rids, scheduled, started, count = phase.rids, phase.scheduled, phase.started, len(phase.rids)
        lag = phase.published - scheduled[-1]
        self.wait_for(rids, drain_s + seconds * 0.5)
        latencies, last = [], started
        for rid, at in zip(rids, scheduled, strict=True):
            if (m := self.answers.get(rid)) is not None:
                latencies.append((m.received_at - at) * 1000)
                last = max(last, m.received_at)
        answered = len(latencies)
        achieved = answered / max(last - started + 1 / rate, 1e-9)
        return {"offered_per_s": rate, "requests": count, "answered": answered,
                "ok": sum(self.ok(r) for r in rids if r in self.answers),
                "achieved_per_s": achieved, "publish_lag_s": lag,
                "loadgen_limited": lag > LOADGEN_LAG_S,
                "sustained": answered == count and achieved >= SUSTAINED_FRACTION * rate,
                **percentiles(latencies)}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.broker.close()
        delete_topics(self.broker, self.topics)


def delete_topics(broker: Broker, topics: Topics) -> None:
    """Best effort: leave no benchmark topics (or emulator subscriptions) behind."""
    try:
        broker.delete_topics(topics.all())
    except Exception:  # noqa: BLE001 - cleanup must never fail a benchmark
        pass
    finally:
        broker.close()  # the admin clients the deletion opened
