"""A serving worker's side of the registry: start on the promoted model, follow promotions.

At start (``starting_model``) a worker serves the version the store's pointer names for
``model.name``, fetching it when its own weights directory does not have it; with nothing
promoted it serves its local weights, as without a registry.

While it serves, ``Follower`` listens to the announcements topic and reads the pointer when one
names its model (and every ``registry.check_every_s`` in case one was missed). A newer
generation is fetched, verified (``registry.verify``) and warmed in this background thread,
then swapped in between two batches: no request waits for it, none is lost, each answer names
the version that produced it. A refused model is announced (``refused``) and counted
(``fmnist_model_refusals``) while the previous one serves on; it is not tried again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fmnist.brokers import Broker, Consumer
from fmnist.config import Config
from fmnist.errors import BrokerError, FmnistError, ModelError
from fmnist.model import artifacts
from fmnist.registry import verify
from fmnist.registry.protocol import Manifest, Pointer, event, event_message, parse_event
from fmnist.registry.store import Store
from fmnist.registry.verify import Refused

log = logging.getLogger("fmnist.registry.follower")
RETRY_S, MAX_RETRY_S = 2.0, 60.0  # after a broker problem, before listening again
WAKE_TYPES = ("promoted", "rolled_back")


class Announcer:
    """Publishes this worker's ``serving`` and ``refused`` announcements; a broker problem is
    logged, never raised: the announcement is for people, the model swap already happened."""

    def __init__(self, cfg: Config, broker: Broker, worker_id: str,
                 on_refusal: Callable[[str, str, str], None] | None = None) -> None:
        self.cfg, self.broker, self.worker_id = cfg, broker, worker_id
        self.on_refusal = on_refusal or (lambda name, version, reason: None)

    def publish(self, body: dict[str, Any]) -> None:
        try:
            producer = self.broker.producer()
            try:
                producer.publish([event_message(self.cfg.registry.events_topic, body)],
                                 timeout_s=self.cfg.broker.connect_timeout_s)
            finally:
                producer.close()
        except BrokerError as exc:
            log.warning("could not announce %s of %s@%s: %s", body["type"], body["name"],
                        body["version"], exc.message)

    def serving(self, name: str, version: str, generation: int, **fields: Any) -> None:
        self.publish(event("serving", name, version, worker_id=self.worker_id,
                           generation=generation, **fields))

    def refused(self, name: str, version: str, refusal: Refused, generation: int,
                serving: str | None) -> None:
        log.error("refused %s@%s (%s): %s; serving %s", name, version, refusal.reason,
                  refusal.message, serving or "nothing")
        self.on_refusal(name, version, refusal.reason)
        self.publish(event("refused", name, version, worker_id=self.worker_id,
                           reason=refusal.reason, detail=refusal.message, generation=generation,
                           serving=serving))


def _manifest(store: Store, name: str, version: str) -> Manifest:
    for manifest in store.manifests(name):
        if manifest.version == version:
            return manifest
    raise Refused("fetch", f"{name}@{version} is promoted but has no manifest in {store.where}.")


def prepare(cfg: Config, store: Store, pointer: Pointer, make: Callable[[Path], Any],
            canary: verify.Canary | None) -> Any:
    """The pointer's model, fetched, verified and warmed; raises Refused or BrokerError."""
    local = cfg.weights_path
    if local.is_file() and artifacts.file_version(local) == pointer.version:
        weights = local  # this worker's own copy of it
    else:
        weights = verify.fetch(cfg, store, _manifest(store, pointer.name, pointer.version))
    return verify.load(weights, make, canary, cfg.registry.canary_min_correct)


def starting_model(cfg: Config, store: Store | None, make: Callable[[Path], Any],
                   announcer: Announcer | None) -> tuple[Any, int]:
    """The model a worker starts with and the pointer generation it stands for (0: none)."""
    local = cfg.weights_path if cfg.weights_path.is_file() else None
    pointer = None
    if store is not None:
        try:
            pointer = store.pointer(cfg.model.name)
        except BrokerError as exc:
            if local is None:
                raise
            log.warning("the model store cannot be read (%s); starting on the local weights",
                        exc.message)
    if pointer is not None:
        started = time.perf_counter()
        try:
            predictor = prepare(cfg, store, pointer, make, verify.load_canary(cfg))  # type: ignore[arg-type]
        except Refused as refusal:
            if announcer is not None:
                announcer.refused(pointer.name, pointer.version, refusal, pointer.generation,
                                  serving=None)
            if local is None:
                raise ModelError(f"The promoted model {pointer.name}@{pointer.version} was "
                                 f"refused ({refusal.reason}: {refusal.message}) and there are "
                                 f"no local weights at {cfg.weights_path}.",
                                 f"Roll back (`fmnist models rollback {pointer.name}`) or promote "
                                 "a good version.") from None
        else:
            log.info("serving %s@%s, promoted (generation %d); ready in %.2f s",
                     pointer.name, pointer.version, pointer.generation,
                     time.perf_counter() - started)
            return predictor, pointer.generation
    if local is None:
        where = f" and nothing is promoted in {store.where}" if store is not None else ""
        raise ModelError(f"No model weights at {cfg.weights_path}{where}.",
                         "Train one (`fmnist train`), or publish and promote one "
                         "(`fmnist models publish PATH`, `fmnist models promote NAME@VERSION`).")
    return make(local), pointer.generation if pointer is not None else 0


class Follower:
    """Follows the pointer of ``model.name``; ``swap`` is called with each new model."""

    def __init__(self, cfg: Config, broker: Broker, store: Store, make: Callable[[Path], Any],
                 swap: Callable[[Any], None], current: Any, generation: int,
                 announcer: Announcer) -> None:
        self.cfg, self.broker, self.store = cfg, broker, store
        self.make, self.swap = make, swap
        self.current, self.generation = current, generation
        self.announcer = announcer
        self.name = cfg.model.name
        self.refused: set[str] = set()
        self.canary = verify.load_canary(cfg)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry", daemon=True)

    def start(self) -> Follower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def _run(self) -> None:
        reader: Consumer | None = None
        next_check = 0.0
        announced = False
        retry_s, last_problem = RETRY_S, ""
        while not self._stop.is_set():
            try:
                if reader is None:
                    if self.cfg.broker.create_topics:
                        self.broker.ensure_topics([self.cfg.registry.events_topic])
                    # listen first, then read the pointer: a promotion in between is not missed
                    reader = self.broker.consumer(self.cfg.registry.events_topic, group=None)
                    next_check = 0.0
                if not announced:
                    self.announcer.serving(self.name, self.current.version, self.generation,
                                           started=True)
                    announced = True
                wait = max(0.0, min(0.25, next_check - time.monotonic()))
                batch = reader.next_batch(100, timeout_s=wait)
                if batch:
                    reader.commit(batch)
                    if any((e := parse_event(m)) is not None and e["name"] == self.name
                           and e["type"] in WAKE_TYPES for m in batch):
                        next_check = 0.0
                if time.monotonic() >= next_check:
                    self.check()
                    next_check = time.monotonic() + self.cfg.registry.check_every_s
                if last_problem:
                    log.info("model registry reachable again")
                retry_s, last_problem = RETRY_S, ""
            except BrokerError as exc:
                if exc.message != last_problem:  # once per problem, not once per retry
                    log.warning("model registry unreachable (%s); serving %s@%s, trying again "
                                "with backoff up to %g s", exc.message, self.name,
                                self.current.version, MAX_RETRY_S)
                last_problem = exc.message
                _close_quietly(reader)
                reader = None
                self._stop.wait(retry_s)
                retry_s = min(retry_s * 2, MAX_RETRY_S)
            except Exception:  # following must never take serving down
                log.exception("model registry check failed; serving on")
                self._stop.wait(RETRY_S)
        _close_quietly(reader)

    def check(self) -> bool:
        """Act on the pointer if it is newer than the last one acted on; True if swapped."""
        pointer = self.store.pointer(self.name)
        if pointer is None or pointer.generation <= self.generation:
            return False
        if pointer.version == self.current.version:
            self.generation = pointer.generation
            self.announcer.serving(self.name, pointer.version, pointer.generation)
            return False
        if pointer.version in self.refused:
            self.generation = pointer.generation
            return False
        started = time.perf_counter()
        try:
            predictor = prepare(self.cfg, self.store, pointer, self.make, self.canary)
        except Refused as refusal:
            self.refused.add(pointer.version)
            self.generation = pointer.generation
            self.announcer.refused(self.name, pointer.version, refusal, pointer.generation,
                                   serving=self.current.version)
            return False
        except FmnistError as exc:  # e.g. the store unreadable: the model is not at fault
            log.warning("could not prepare %s@%s (%s); trying again at the next check",
                        self.name, pointer.version, exc.message)
            return False
        previous = self.current.version
        self.swap(predictor)
        self.current, self.generation = predictor, pointer.generation
        took = time.perf_counter() - started
        log.info("now serving %s@%s (%s, generation %d; was %s; ready in %.2f s)", self.name,
                 pointer.version, pointer.action, pointer.generation, previous, took)
        self.announcer.serving(self.name, pointer.version, pointer.generation,
                               previous=previous, prepare_s=round(took, 3))
        return True


def _close_quietly(reader: Consumer | None) -> None:
    try:
        if reader is not None:
            reader.close()
    except Exception:  # closing a broken client may fail too
        pass
