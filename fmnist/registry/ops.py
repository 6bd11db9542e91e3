"""What ``fmnist models`` does: publish, promote, roll back, list and show.

Each write goes to the store first and is then announced on ``registry.events_topic``, which
wakes the workers; a worker that misses the announcement finds the pointer at its next periodic
check. The store is the truth, the announcements are its news and its history.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fmnist.brokers import Broker
from fmnist.brokers.retained import read_all
from fmnist.config import Config
from fmnist.errors import BrokerError, ModelError, UsageError
from fmnist.jobs.protocol import who
from fmnist.model import artifacts
from fmnist.registry.protocol import (
    LATEST,
    VERSION_CHARS,
    Manifest,
    Pointer,
    event,
    event_message,
    parse_event,
    parse_ref,
    sha256_of,
)
from fmnist.registry.store import Store

LINEAGE_CONFIG = ("model", "train")  # the sections of meta.json's config a lineage repeats


def announce(cfg: Config, broker: Broker, body: dict[str, Any]) -> None:
    if cfg.broker.create_topics:
        broker.ensure_topics([cfg.registry.events_topic])
    producer = broker.producer()
    try:
        producer.publish([event_message(cfg.registry.events_topic, body)],
                         timeout_s=cfg.broker.connect_timeout_s)
    finally:
        producer.close()


def publish(cfg: Config, broker: Broker, store: Store, weights: Path,
            trained_by: str | None = None, name: str | None = None) -> Manifest:
    """Upload a local model (weights and their meta.json) and announce it. Publishing the
    same bytes again returns the stored manifest."""
    meta = artifacts.read_meta(weights)  # a model this code cannot serve is not published
    sha = sha256_of(weights)
    name = name or meta.get("name") or weights.stem
    parse_ref(name)  # a valid name
    version = sha[:VERSION_CHARS]
    existing = {m.version: m for m in store.manifests(name)}
    if version in existing:
        return existing[version]
    pointer = store.pointer(name)
    config = meta.get("config") or {}
    lineage = {
        "parent": f"{name}@{pointer.version}" if pointer else None,  # what served meanwhile
        "teacher": (config.get("train") or {}).get("teacher"),
        "trained_by_job": trained_by or meta.get("job_id"),
        "dataset": meta.get("dataset") or {},
        "feedback": meta.get("feedback"),
        "config": {k: config[k] for k in LINEAGE_CONFIG if k in config},
        "source": str(weights),
    }
    manifest = Manifest(name=name, version=version, sha256=sha, size=weights.stat().st_size,
                        meta={**meta, "name": name, "version": version}, lineage=lineage,
                        published_at=time.time(), published_by=who())
    stored = store.put(manifest, weights)
    announce(cfg, broker, event("published", name, version, by=stored.published_by,
                                metrics=_headline(stored), trained_by_job=trained_by))
    return stored


def _headline(manifest: Manifest) -> dict[str, Any]:
    m = manifest.metrics
    return {k: m[k] for k in ("test_accuracy", "val_accuracy", "epochs") if k in m}


def resolve(store: Store, ref: str, default_name: str) -> Manifest:
    """The one published model ``NAME@VERSION`` (a version prefix will do) names."""
    name, version = parse_ref(ref, default_name)
    manifests = store.manifests(name)
    if not manifests:
        raise ModelError(f"No model named {name} is published in {store.where}.",
                         "Publish one with `fmnist models publish WEIGHTS`.")
    if version is None:
        raise UsageError(f"Say which version of {name}: {name}@VERSION.",
                         f"`fmnist models list {name}` shows them.")
    if version == LATEST:
        return manifests[-1]
    matches = [m for m in manifests if m.sha256.startswith(version)]
    if len(matches) != 1:
        problem = "is ambiguous" if matches else "is not published"
        raise ModelError(f"{name}@{version} {problem} in {store.where}.",
                         f"`fmnist models list {name}` shows the versions.")
    return matches[0]


def accuracy(manifest: Manifest) -> float | None:
    value = manifest.metrics.get("test_accuracy")
    return float(value) if isinstance(value, (int, float)) else None


def check_gates(target: Manifest, current: Manifest | None, min_accuracy: float | None,
                max_drop: float | None) -> None:
    """``promote``'s quality gates: a minimum test accuracy, and no worse than the serving
    model by more than ``max_drop``."""
    acc = accuracy(target)
    if (min_accuracy is not None or max_drop is not None) and acc is None:
        raise ModelError(f"{target.ref} has no test accuracy in its meta.json, so the gate "
                         "cannot be checked.", "Evaluate it first, or promote without a gate.")
    if min_accuracy is not None and acc is not None and acc < min_accuracy:
        raise ModelError(f"{target.ref} has test accuracy {acc:.4f}, under the required "
                         f"{min_accuracy:.4f}; nothing was promoted.",
                         "Train a better model, or lower --min-accuracy.")
    if max_drop is not None and current is not None and acc is not None:
        served = accuracy(current)
        if served is not None and acc < served - max_drop:
            raise ModelError(f"{target.ref} has test accuracy {acc:.4f}, {served - acc:.4f} "
                             f"under the serving {current.ref} ({served:.4f}); at most "
                             f"{max_drop:.4f} is allowed. Nothing was promoted.",
                             "Train a better model, or raise --max-drop.")


def promote(cfg: Config, broker: Broker, store: Store, ref: str,
            min_accuracy: float | None = None, max_drop: float | None = None) -> Pointer:
    """Make ``ref`` the version every worker serves."""
    target = resolve(store, ref, cfg.model.name)
    pointer = store.pointer(target.name)
    current = None
    if pointer is not None:
        current = next((m for m in store.manifests(target.name)
                        if m.version == pointer.version), None)
    check_gates(target, current, min_accuracy, max_drop)
    history = ([pointer.version, *pointer.history] if pointer is not None
               and pointer.version != target.version else (pointer.history if pointer else []))
    new = Pointer(name=target.name, version=target.version,
                  generation=(pointer.generation if pointer else 0) + 1, history=history[:50],
                  by=who(), at=time.time(), action="promoted")
    store.set_pointer(new)
    announce(cfg, broker, event("promoted", new.name, new.version, generation=new.generation,
                                previous=pointer.version if pointer else None, by=new.by))
    return new


def rollback(cfg: Config, broker: Broker, store: Store, name: str) -> Pointer:
    """Serve the version served before the current one."""
    name, _ = parse_ref(name, cfg.model.name)
    pointer = store.pointer(name)
    if pointer is None:
        raise ModelError(f"Nothing of {name} was ever promoted in {store.where}.",
                         f"Promote a version first: `fmnist models promote {name}@VERSION`.")
    if not pointer.history:
        raise ModelError(f"{name}@{pointer.version} is the first version promoted; there is "
                         "nothing to roll back to.",
                         f"Promote another version: `fmnist models promote {name}@VERSION`.")
    new = Pointer(name=name, version=pointer.history[0], generation=pointer.generation + 1,
                  history=pointer.history[1:], by=who(), at=time.time(), action="rolled_back")
    store.set_pointer(new)
    announce(cfg, broker, event("rolled_back", name, new.version, generation=new.generation,
                                previous=pointer.version, by=new.by))
    return new


def listing(store: Store, name: str | None = None) -> list[dict[str, Any]]:
    """One row per published model, newest first, saying which one serves."""
    rows = []
    serving: dict[str, Pointer | None] = {}
    for m in reversed(store.manifests(name)):
        if m.name not in serving:
            serving[m.name] = store.pointer(m.name)
        pointer = serving[m.name]
        rows.append({"name": m.name, "version": m.version, "serving": bool(
            pointer and pointer.version == m.version), "test_accuracy": accuracy(m),
            "size": m.size, "published_at": m.published_at, "published_by": m.published_by,
            "trained_by_job": m.lineage.get("trained_by_job")})
    return rows


def fleet(events: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """What the announcements say of ``name``: each worker's latest version and the refusals."""
    workers: dict[str, dict[str, Any]] = {}
    refusals = []
    for e in sorted(events, key=lambda e: e.get("time", 0)):
        if e.get("name") != name:
            continue
        if e["type"] == "serving":
            workers[e.get("worker_id", "?")] = {"version": e["version"], "since": e["time"],
                                                "generation": e.get("generation")}
        elif e["type"] == "refused":
            refusals.append({k: e.get(k) for k in ("version", "worker_id", "reason", "detail",
                                                   "time", "serving")})
    return {"workers": workers, "refusals": refusals}


def show(cfg: Config, broker: Broker, store: Store, ref: str) -> dict[str, Any]:
    """Everything known of a model name (or one version): versions, the pointer, what each
    worker serves, refusals, live feedback accuracy."""
    name, version = parse_ref(ref, cfg.model.name)
    manifests = store.manifests(name)
    if not manifests:
        raise ModelError(f"No model named {name} is published in {store.where}.",
                         "Publish one with `fmnist models publish WEIGHTS`.")
    if version is not None:
        manifests = [resolve(store, ref, cfg.model.name)]
    pointer = store.pointer(name)
    events = [e for e in read_all(broker, cfg.registry.events_topic, parse_event)
              if e.get("name") == name]
    from fmnist import feedback

    try:
        live = feedback.accuracy_by_version(feedback.read(broker, cfg))
    except BrokerError:  # no feedback topic yet: nobody has labelled a request
        live = {}
    seen = fleet(events, name)
    return {
        "name": name,
        "serving": pointer.as_dict() if pointer else None,
        "store": store.where,
        "versions": [{**_summary(m), "feedback": live.get(m.version),
                      "refusals": [r for r in seen["refusals"] if r["version"] == m.version]}
                     for m in reversed(manifests)],
        "workers": seen["workers"],
        "refusals": seen["refusals"],
    }


def _summary(m: Manifest) -> dict[str, Any]:
    return {"ref": m.ref, "version": m.version, "sha256": m.sha256, "size": m.size,
            "metrics": m.metrics, "lineage": m.lineage, "published_at": m.published_at,
            "published_by": m.published_by, "location": m.location}


class FleetWatch:
    """Announcements of one model from the moment it is made: open it before a promote or a
    rollback, then ``wait`` for the workers to take the new version."""

    def __init__(self, cfg: Config, broker: Broker) -> None:
        if cfg.broker.create_topics:
            broker.ensure_topics([cfg.registry.events_topic])
        self.reader = broker.consumer(cfg.registry.events_topic, group=None)

    def wait(self, pointer: Pointer, workers: int, timeout_s: float,
             seen: Callable[[dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
        """Each worker's first ``serving`` or ``refused`` of ``pointer``'s generation, until
        ``workers`` of them answered or ``timeout_s`` passed."""
        answers: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(answers) < workers and (left := deadline - time.monotonic()) > 0:
            batch = self.reader.next_batch(100, timeout_s=min(left, 0.25))
            self.reader.commit(batch)
            for message in batch:
                e = parse_event(message)
                if (e is not None and e["name"] == pointer.name
                        and e["type"] in ("serving", "refused")
                        and e.get("generation") == pointer.generation
                        and e.get("worker_id") not in answers):
                    answers[e["worker_id"]] = e
                    if seen is not None:
                        seen(e)
        return answers

    def close(self) -> None:
        self.reader.close()
