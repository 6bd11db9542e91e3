"""Model CPU per image at given batch sizes: what fmnist's forward pass alone costs, for
benchmarks/peers.py's headline (the batch the worker served in its burst).

    .venv/bin/python benchmarks/peers/model_cpu.py 1 64 181 256

Runs ``Predictor.probabilities`` - the worker's compiled forward pass with its padded buckets
and batch plan, at ``serve.max_batch_size`` and ``serve.threads`` - on the decoded images of
Images/ repeated to each batch size, and prints one JSON object: per batch size, CPU
microseconds per image (user + system time of the whole process, so XLA's threads count) and
wall images/s, each the median of ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("batches", type=int, nargs="+")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--images", type=int, default=4096, help="images per run and batch size")
    args = ap.parse_args(argv)

    from fmnist import config, imaging
    from fmnist.model.predictor import Predictor

    cfg = config.load()
    predictor = Predictor.configured(cfg, max_batch=cfg.serve.max_batch_size)
    pixels = np.stack([imaging.decode(p.read_bytes(), cfg.imaging)
                       for p in sorted((ROOT / "Images").glob("*.png"))])
    out = {}
    for batch in args.batches:
        x = np.resize(pixels, (batch, 28, 28))
        predictor.probabilities(x)  # not timed
        calls = max(3, args.images // batch)
        cpu, rate = [], []
        for _ in range(args.runs):
            wall, used = time.perf_counter(), time.process_time()
            for _ in range(calls):
                predictor.probabilities(x)
            used, wall = time.process_time() - used, time.perf_counter() - wall
            cpu.append(used / (calls * batch) * 1e6)
            rate.append(calls * batch / wall)
        out[str(batch)] = {"cpu_us_per_image": round(statistics.median(cpu), 1),
                           "images_per_s": round(statistics.median(rate), 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
