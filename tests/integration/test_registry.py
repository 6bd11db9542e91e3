"""The model registry against the real brokers: two workers in separate homes (no shared
weights directory) start from the store, follow a promotion and a rollback under load without
losing a request, and refuse damaged, incompatible and failing models while serving on."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from fmnist import config
from fmnist.brokers import Broker
from fmnist.registry import ops
from fmnist.registry.protocol import Pointer
from fmnist.registry.store import DirStore, open_store
from fmnist.testing import models, rollout
from fmnist.testing.rollout import SHIPPED

pytestmark = pytest.mark.slow


def test_fleet_follows_promote_and_rollback_without_losing_a_request(
        broker_name: str, tmp_path: Path) -> None:
    report = rollout.rollout(broker_name, tmp_path, per_s=50.0)
    facts = report.facts
    assert report.sent > 300 and report.lost == 0 and report.error_responses == 0, report
    assert set(facts["cold_start_s"]) == set(facts["workers"]), facts  # both fetched v1
    v1, v2 = facts["v1"], facts["v2"]
    for worker in facts["workers"]:
        # v1, then v2 after the promote, then v1 after the rollback, never back and forth in
        # between (Pub/Sub may leave a worker without requests for a while: a subsequence)
        assert _subsequence(facts["switches"].get(worker, []), [v1, v2, v1]), facts
        assert facts["promote_s"][worker] < 30 and facts["rollback_s"][worker] < 30, facts
    # every answer after a worker announced the switch came from the new version
    assert facts["stale_answers"] == 0, facts
    # the fleet answered from v2 after the promote and from v1 after the rollback (on Pub/Sub
    # the emulator may hand the last seconds' requests all to one worker, so not each worker)
    assert any(v2 in s for s in facts["switches"].values()), facts
    assert any(t is not None for t in facts["first_v1_answer_after_rollback_s"].values()), facts


def _subsequence(runs: list[str], allowed: list[str]) -> bool:
    it = iter(allowed)
    return all(any(v == a for a in it) for v in runs)


def test_bad_models_are_refused_by_every_worker_which_serves_on(
        broker_name: str, tmp_path: Path) -> None:
    report = rollout.refusals(broker_name, tmp_path)
    facts = report.facts
    assert report.lost == 0 and report.error_responses == 0, report
    assert all(facts["alive"]), report.facts
    for reason in ("checksum", "incompatible", "canary"):
        assert facts["refused"][reason] == {w: reason for w in facts["workers"]}, facts["refused"]
    # every answer came from v1 (on Pub/Sub one worker may happen to get no request at all)
    assert facts["switches"] and all(s == [facts["v1"]] for s in facts["switches"].values()), \
        facts["switches"]
    assert facts["metrics_status"] == 200
    for reason in ("checksum", "incompatible", "canary"):
        assert re.search(rf'fmnist_model_refusals_total{{reason="{reason}"}} 1\.0',
                         facts["metrics"]), facts["metrics"][-3000:]
    assert re.search(rf'fmnist_model_info{{name="fmnist",version="{facts["v1"]}"}} 1\.0',
                     facts["metrics"])
    shown = {(r["version"], r["worker_id"], r["reason"]) for r in facts["shown_refusals"]}
    assert shown == {(facts["versions"][reason], w, reason)
                     for reason in ("checksum", "incompatible", "canary")
                     for w in facts["workers"]}


@pytest.mark.kafka
def test_kafka_store_round_trips_a_model_in_chunks(kafka: Broker, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:10]
    cfg = config.with_overrides(config.load(), {"registry": {
        "topic": f"m-{tag}", "blob_topic": f"m-{tag}.blobs", "events_topic": f"e-{tag}",
        "chunk_bytes": 200_000}}, "the test")
    store = open_store(cfg, kafka)
    other = ops.publish(cfg, kafka, store, models.variant(SHIPPED, tmp_path / "o" / "x.keras"))
    manifest = ops.publish(cfg, kafka, store, SHIPPED)
    assert manifest.location["chunks"] == -(-SHIPPED.stat().st_size // 200_000)
    assert ops.publish(cfg, kafka, store, SHIPPED) == manifest  # the same bytes: no new copy
    fetched = tmp_path / "fetched.keras"
    store.fetch(manifest, fetched)
    assert fetched.read_bytes() == SHIPPED.read_bytes()
    assert [m.version for m in store.manifests("fmnist")] == [other.version, manifest.version]
    assert manifest.lineage["dataset"] and manifest.lineage["config"]["model"]
    first = ops.promote(cfg, kafka, store, other.ref)
    second = ops.promote(cfg, kafka, store, manifest.ref)
    assert (first.generation, second.generation, second.history) == (1, 2, [other.version])
    back = ops.rollback(cfg, kafka, store, "fmnist")
    assert (back.version, back.generation, back.history) == (other.version, 3, [])
    assert store.pointer("fmnist") == back


def test_dir_store_promote_gates_and_rollback(tmp_path: Path) -> None:
    store = DirStore(tmp_path / "store")
    assert store.pointer("fmnist") is None and store.manifests() == []
    store.set_pointer(Pointer("fmnist", "abc", 1, [], "me", 0.0, "promoted"))
    assert store.pointer("fmnist") == Pointer("fmnist", "abc", 1, [], "me", 0.0, "promoted")
    (tmp_path / "store" / "fmnist" / "serving.json").write_text("{not json")
    with pytest.raises(Exception, match="damaged"):
        store.pointer("fmnist")
