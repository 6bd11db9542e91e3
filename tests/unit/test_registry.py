"""The registry's logic without Keras or a broker: the directory store, promote gates and
rollback, the fleet's history, and a worker's decisions (which pointer to act on, what to do
with a refused or missing model). tests/integration/test_registry.py runs it for real."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fmnist import config
from fmnist.errors import ModelError, UsageError
from fmnist.registry import follower, ops, verify
from fmnist.registry.protocol import Manifest, Pointer, parse_event, parse_ref, sha256_of
from fmnist.registry.store import DirStore
from tests.fakes import MemoryBroker

ROOT = Path(__file__).resolve().parents[2]
META = json.loads((ROOT / "weights" / "fmnist.meta.json").read_text())


def manifest_of(path: Path, name: str = "fmnist", accuracy: float | None = 0.93,
                at: float = 1.0) -> Manifest:
    sha = sha256_of(path)
    meta = {**META, "metrics": {} if accuracy is None else {"test_accuracy": accuracy}}
    return Manifest(name, sha[:12], sha, path.stat().st_size, meta, {}, at, "me")


@pytest.fixture
def cfg(tmp_path: Path) -> config.Config:
    return config.with_overrides(config.load(), {"registry": {"dir": str(tmp_path / "store")},
                                                 "model": {"weights_dir": str(tmp_path / "w")}},
                                 "the test")


@pytest.fixture
def store(tmp_path: Path) -> DirStore:
    return DirStore(tmp_path / "store")


def artifact(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / f"a-{content.hex()[:8]}.keras"
    path.write_bytes(content)
    return path


def test_refs_name_a_model_and_optionally_a_hex_version() -> None:
    assert parse_ref("fmnist@3f2a9c") == ("fmnist", "3f2a9c")
    assert parse_ref("fmnist") == ("fmnist", None)
    assert parse_ref("@3f2a", default_name="fmnist") == ("fmnist", "3f2a")
    for bad in ("../x@abcd", "fmnist@nothex", "fmnist@ab", ""):
        with pytest.raises(UsageError):
            parse_ref(bad)


def test_dir_store_keeps_bytes_manifests_and_the_pointer(tmp_path: Path, store: DirStore
                                                         ) -> None:
    one, two = artifact(tmp_path, b"one" * 100), artifact(tmp_path, b"two" * 100)
    first = store.put(manifest_of(one, at=1.0), one)
    second = store.put(manifest_of(two, at=2.0), two)
    assert [m.version for m in store.manifests("fmnist")] == [first.version, second.version]
    assert store.manifests("other") == []
    out = tmp_path / "out.keras"
    store.fetch(second, out)
    assert out.read_bytes() == b"two" * 100
    pointer = Pointer("fmnist", second.version, 1, [], "me", 3.0, "promoted")
    store.set_pointer(pointer)
    assert DirStore(tmp_path / "store").pointer("fmnist") == pointer  # another worker sees it
    (tmp_path / "store" / "fmnist" / "serving.json").write_text("{half")
    with pytest.raises(ModelError, match="damaged"):
        store.pointer("fmnist")


def test_promote_gates_refuse_a_worse_model(tmp_path: Path, cfg: config.Config,
                                            store: DirStore) -> None:
    broker = MemoryBroker()
    def put(content: bytes, accuracy: float | None) -> Manifest:
        path = artifact(tmp_path, content)
        return store.put(manifest_of(path, accuracy=accuracy), path)

    good, worse, unknown = put(b"good", 0.93), put(b"worse", 0.90), put(b"unknown", None)
    ops.promote(cfg, broker, store, good.ref, min_accuracy=0.92)
    with pytest.raises(ModelError, match="under the required 0.9500"):
        ops.promote(cfg, broker, store, good.ref, min_accuracy=0.95)
    with pytest.raises(ModelError, match="0.0300 under the serving"):
        ops.promote(cfg, broker, store, worse.ref, max_drop=0.01)
    with pytest.raises(ModelError, match="no test accuracy"):
        ops.promote(cfg, broker, store, unknown.ref, max_drop=0.05)
    assert store.pointer("fmnist").version == good.version  # nothing refused was promoted
    pointer = ops.promote(cfg, broker, store, worse.ref, max_drop=0.05)
    assert (pointer.version, pointer.generation, pointer.history) == (worse.version, 2,
                                                                      [good.version])
    types = [parse_event(m)["type"] for m in _as_messages(broker, cfg)]  # type: ignore[index]
    assert types == ["promoted", "promoted"]


def test_rollback_walks_back_the_history_and_says_when_it_cannot(
        tmp_path: Path, cfg: config.Config, store: DirStore) -> None:
    broker = MemoryBroker()
    with pytest.raises(ModelError, match="ever promoted"):
        ops.rollback(cfg, broker, store, "fmnist")
    refs = []
    for content in (b"a", b"b", b"c"):
        path = artifact(tmp_path, content)
        refs.append(store.put(manifest_of(path), path))
        ops.promote(cfg, broker, store, refs[-1].ref)
    assert ops.rollback(cfg, broker, store, "fmnist").version == refs[1].version
    back = ops.rollback(cfg, broker, store, "fmnist")
    assert (back.version, back.generation) == (refs[0].version, 5)
    with pytest.raises(ModelError, match="nothing to roll back to"):
        ops.rollback(cfg, broker, store, "fmnist")


def test_a_version_prefix_must_name_exactly_one_model(tmp_path: Path, cfg: config.Config,
                                                      store: DirStore) -> None:
    path = artifact(tmp_path, b"x")
    stored = store.put(manifest_of(path), path)
    assert ops.resolve(store, f"fmnist@{stored.sha256[:6]}", "fmnist") == stored
    with pytest.raises(ModelError, match="is not published"):
        ops.resolve(store, "fmnist@0000", "fmnist")
    with pytest.raises(UsageError, match="Say which version"):
        ops.resolve(store, "fmnist", "fmnist")


def test_fleet_history_keeps_each_workers_latest_version_and_every_refusal() -> None:
    events = [
        {"type": "serving", "name": "fmnist", "version": "v1", "worker_id": "a", "time": 1},
        {"type": "serving", "name": "fmnist", "version": "v1", "worker_id": "b", "time": 1},
        {"type": "refused", "name": "fmnist", "version": "v2", "worker_id": "a", "time": 2,
         "reason": "canary", "detail": "1 of 10", "serving": "v1"},
        {"type": "serving", "name": "fmnist", "version": "v3", "worker_id": "b", "time": 3},
        {"type": "serving", "name": "other", "version": "x", "worker_id": "c", "time": 3},
    ]
    seen = ops.fleet(events, "fmnist")
    assert {w: s["version"] for w, s in seen["workers"].items()} == {"a": "v1", "b": "v3"}
    assert [(r["version"], r["reason"]) for r in seen["refusals"]] == [("v2", "canary")]


class FakePredictor:
    def __init__(self, version: str) -> None:
        self.version = version


class FakeStore:
    where = "memory"

    def __init__(self, pointer: Pointer | None, manifests: list[Manifest]) -> None:
        self.current, self.known = pointer, manifests

    def pointer(self, name: str) -> Pointer | None:
        return self.current

    def manifests(self, name: str | None = None) -> list[Manifest]:
        return self.known


def make_follower(cfg: config.Config, store: Any, loads: list[str], refuse: set[str],
                  monkeypatch: pytest.MonkeyPatch
                  ) -> tuple[follower.Follower, list[Any], MemoryBroker]:
    broker = MemoryBroker()
    swapped: list[Any] = []

    def prepare(cfg_: Any, store_: Any, pointer: Pointer, make: Any, canary: Any) -> Any:
        loads.append(pointer.version)
        if pointer.version in refuse:
            raise verify.Refused("canary", "classified 1 of 10")
        return FakePredictor(pointer.version)

    f = follower.Follower(cfg, broker, store, lambda p: None, swapped.append,
                          FakePredictor("v1"), 1, follower.Announcer(cfg, broker, "w1"))
    monkeypatch.setattr(follower, "prepare", prepare)
    return f, swapped, broker


def test_a_worker_acts_only_on_newer_pointers_and_never_retries_a_refused_model(
        cfg: config.Config, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    store = FakeStore(Pointer("fmnist", "v0", 1, [], "me", 0, "promoted"), [])
    f, swapped, broker = make_follower(cfg, store, loads, {"bad"}, monkeypatch)
    assert not f.check() and loads == []  # generation 1: what it started on
    store.current = Pointer("fmnist", "v2", 2, ["v1"], "me", 0, "promoted")
    assert f.check() and [p.version for p in swapped] == ["v2"] and f.generation == 2
    store.current = Pointer("fmnist", "v1", 1, [], "me", 0, "promoted")  # older: ignored
    assert not f.check() and f.current.version == "v2"
    store.current = Pointer("fmnist", "bad", 3, ["v2"], "me", 0, "promoted")
    assert not f.check() and f.current.version == "v2" and f.refused == {"bad"}
    store.current = Pointer("fmnist", "bad", 4, ["v2"], "me", 0, "promoted")
    assert not f.check() and loads == ["v2", "bad"]  # not fetched and checked again
    store.current = Pointer("fmnist", "v2", 5, [], "me", 0, "rolled_back")  # what it serves
    assert not f.check() and f.generation == 5
    sent = [parse_event(m) for m in _as_messages(broker, cfg)]
    assert [(e["type"], e["version"]) for e in sent if e] == [
        ("serving", "v2"), ("refused", "bad"), ("serving", "v2")]
    assert sent[1]["reason"] == "canary" and sent[1]["serving"] == "v2"  # type: ignore[index]


def test_starting_model_falls_back_to_local_weights_only_when_they_exist(
        tmp_path: Path, cfg: config.Config, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any) -> Any:
        raise verify.Refused("checksum", "hashes to something else")

    monkeypatch.setattr(follower, "prepare", refuse)
    store = FakeStore(Pointer("fmnist", "v9", 4, [], "me", 0, "promoted"), [])
    with pytest.raises(ModelError, match=r"fmnist@v9 was refused \(checksum"):
        follower.starting_model(cfg, store, lambda p: FakePredictor("local"), None)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="nothing is promoted"):
        follower.starting_model(cfg, FakeStore(None, []), lambda p: None, None)  # type: ignore[arg-type]
    cfg.weights_path.parent.mkdir(parents=True)
    cfg.weights_path.write_bytes(b"local")
    predictor, generation = follower.starting_model(
        cfg, store, lambda p: FakePredictor("local"), None)  # type: ignore[arg-type]
    assert (predictor.version, generation) == ("local", 4)  # refused v9 is not tried again


def test_fetch_refuses_bytes_that_do_not_match_the_manifest(tmp_path: Path, cfg: config.Config,
                                                            store: DirStore) -> None:
    good = artifact(tmp_path, b"good bytes")
    manifest = manifest_of(good)
    damaged = artifact(tmp_path, b"damaged!!!")
    stored = store.put(manifest, damaged)  # the store's copy no longer matches its manifest
    with pytest.raises(verify.Refused) as refused:
        verify.fetch(cfg, store, stored)
    assert refused.value.reason == "checksum"
    assert not verify.cached_path(cfg, stored).exists()  # nothing damaged is kept
    (tmp_path / "store" / "fmnist" / stored.version / "model.keras").unlink()
    with pytest.raises(verify.Refused) as gone:
        verify.fetch(cfg, store, replace(stored))
    assert gone.value.reason == "fetch"


def _as_messages(broker: MemoryBroker, cfg: config.Config) -> list[Any]:
    from fmnist.brokers import Message

    return [Message(m.value, m.headers, m.key, m.topic, str(i), None, 0.0)
            for i, m in enumerate(broker.topics.get(cfg.registry.events_topic, []))]


def test_publish_records_lineage_and_the_same_bytes_twice_are_one_version(
        tmp_path: Path, cfg: config.Config, store: DirStore) -> None:
    broker = MemoryBroker()
    shipped = ROOT / "weights" / "fmnist.keras"
    first = ops.publish(cfg, broker, store, shipped, trained_by="job-1")
    assert first.version == META["version"] and first.sha256.startswith(first.version)
    assert first.lineage["trained_by_job"] == "job-1" and first.lineage["parent"] is None
    assert first.lineage["dataset"] == META["dataset"]
    assert set(first.lineage["config"]) == {"model", "train"}
    assert ops.publish(cfg, broker, store, shipped) == first  # nothing new
    ops.promote(cfg, broker, store, first.ref)
    full = ops.publish(cfg, broker, store, ROOT / "weights" / "fmnist-full.keras", name="fmnist")
    assert full.meta["name"] == "fmnist" and full.lineage["parent"] == first.ref
    assert [r["version"] for r in ops.listing(store)] == [full.version, first.version]
    assert [r["serving"] for r in ops.listing(store)] == [False, True]
    assert ops.resolve(store, "fmnist@latest", "fmnist") == full
    events = [parse_event(m) for m in _as_messages(broker, cfg)]
    assert [e["type"] for e in events if e] == ["published", "promoted", "published"]
    with pytest.raises(ModelError, match="No model weights"):
        ops.publish(cfg, broker, store, tmp_path / "missing.keras")
