"""How long publishing and fetching a model takes in each store.

    .venv/bin/python benchmarks/model_store.py [--rounds 5] [--out FILE.json]

Publishes the shipped weights (1.6 MB) and the full network's (2.5 MB) under fresh names to a
private Kafka store (two new compacted topics) and to a directory store, then fetches each
back, ``rounds`` times; prints the medians. A fetch here is the store's part of a worker's
switch; the checks and the warm-up come on top (benchmarks/rollout.py times the whole).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from fmnist import config
from fmnist.brokers import connect
from fmnist.registry import ops
from fmnist.registry.store import DirStore, open_store
from fmnist.testing.processes import ROOT

MODELS = {"served": ROOT / "weights" / "fmnist.keras", "full": ROOT / "weights" / "fmnist-full.keras"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:8]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fmnist-store-") as tmp:
        cfg = config.with_overrides(config.load(), {"registry": {
            "topic": f"bench-models-{tag}", "blob_topic": f"bench-models-{tag}.blobs",
            "events_topic": f"bench-model-events-{tag}", "dir": str(Path(tmp) / "store")}},
            "the benchmark")
        broker = connect("kafka", cfg)
        try:
            for kind, store in (("kafka", open_store(cfg, broker)),
                                ("dir", DirStore(cfg.registry.dir))):
                for label, weights in MODELS.items():
                    publish, fetch = [], []
                    for i in range(args.rounds):
                        name = f"bench-{label}-{tag}-{i}"
                        started = time.perf_counter()
                        manifest = ops.publish(cfg, broker, store, weights, name=name)
                        publish.append(time.perf_counter() - started)
                        started = time.perf_counter()
                        store.fetch(manifest, Path(tmp) / f"{name}.keras")
                        fetch.append(time.perf_counter() - started)
                    row = {"store": kind, "model": label, "bytes": weights.stat().st_size,
                           "publish_s": round(statistics.median(publish), 3),
                           "fetch_s": round(statistics.median(fetch), 3)}
                    rows.append(row)
                    print(f"{kind:6} {label:7} {row['bytes'] / 1e6:4.1f} MB  publish "
                          f"{row['publish_s']:.3f} s  fetch {row['fetch_s']:.3f} s", flush=True)
            broker.delete_topics([cfg.registry.topic, cfg.registry.blob_topic,
                                  cfg.registry.events_topic])
        finally:
            broker.close()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "what": f"median of {args.rounds} rounds: publish (upload and announce) and fetch",
            "command": "python benchmarks/model_store.py " + " ".join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
