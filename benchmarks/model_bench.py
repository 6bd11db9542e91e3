"""Model only: the worker's inference path without a broker, printed as one JSON object.

Run by bench.py in its own process (so the orchestrator never imports TensorFlow):

    python benchmarks/model_bench.py --weights weights/fmnist.keras --threads 1 --runs 3

* images/s by batch size through ``Predictor.probabilities`` (the compiled forward pass the
  worker calls, never ``model.predict``), on real decoded images from Images/;
* single-image latency (one image, one forward pass): median and p99;
* the other per-request CPU costs of the worker, in microseconds: PNG decode (one at a time, and
  per image of a 256-image ``decode_many``), an OIP [1, 28, 28] body's parse, request-header
  parsing, ``describe`` (top-k) and the JSON response encoding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def pngs() -> list[bytes]:
    return [p.read_bytes() for p in sorted((ROOT / "Images").glob("*.png"))]


def per_call_us(fn, calls: int) -> float:
    """Median over 5 rounds of the mean cost of one call, in microseconds."""
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for i in range(calls):
            fn(i)
        rounds.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(rounds)


def request_costs(predictor, cfg) -> dict[str, float]:
    """What a worker spends per request outside the forward pass (one core, microseconds)."""
    from fmnist import imaging
    from fmnist.brokers.base import Message
    from fmnist.serving import oip, protocol

    payloads = pngs()
    many = payloads * (256 // len(payloads))  # a batch, as the worker decodes it
    pixels = np.rint(imaging.decode(payloads[0], cfg.imaging)).astype(int).ravel().tolist()
    oip_body = json.dumps({"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "UINT8",
                                       "data": pixels}]}).encode()
    model = {"name": predictor.name, "version": predictor.version}
    messages = [Message(value=p, headers=protocol.request_headers(protocol.new_request_id(),
                                                                  "image/png"),
                        key=None, topic="req", source_id=f"req/0/{i}", broker_time_ms=None,
                        received_at=time.time()) for i, p in enumerate(payloads)]
    requests = [protocol.parse_request(m, "res")[0] for m in messages]
    probs = predictor.probabilities(np.stack([imaging.decode(p, cfg.imaging) for p in payloads]))
    preds = [p.as_dict() for p in predictor.describe_many(probs)]
    batch = np.resize(probs, (256, probs.shape[1]))
    n = len(payloads)
    return {
        "decode_png": per_call_us(lambda i: imaging.decode(payloads[i % n], cfg.imaging), 400),
        # per image of a batch through decode_many (docs/decisions.md#batch-decode)
        "decode_many_png": per_call_us(lambda i: imaging.decode_many(many, cfg.imaging), 5)
        / len(many),
        "oip_parse": per_call_us(lambda i: oip.parse(oip_body), 400),
        "parse_request": per_call_us(lambda i: protocol.parse_request(messages[i % n], "res"), 2000),
        # the worker ranks a whole batch at once (describe_many): per answer, batches of 256
        "describe": per_call_us(lambda i: predictor.describe_many(batch), 20) / len(batch),
        "response_json": per_call_us(
            lambda i: protocol.response(requests[i % n], model=model, worker_id="bench-1",
                                        inference_ms=1.0, prediction=preds[i % n]), 2000),
    }


def throughput(predictor, pixels: np.ndarray, batch: int, seconds: float) -> float:
    x = np.resize(pixels, (batch, 28, 28, 1)).astype(np.float32)
    predictor.probabilities(x)  # not timed
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or calls < 3:
        predictor.probabilities(x)
        calls += 1
    return batch * calls / elapsed


def latency(predictor, pixels: np.ndarray, calls: int) -> dict[str, float]:
    one = pixels[:1]
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        predictor.probabilities(one)
        times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=0, help="serve.threads (0 = all cores)")
    ap.add_argument("--backend", default="auto", help="serve.backend: auto, jax or tensorflow")
    ap.add_argument("--batches", default="1,8,32,128,512")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0, help="per batch size and run")
    ap.add_argument("--latency-calls", type=int, default=300)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    started = time.perf_counter()
    from fmnist import config, imaging
    from fmnist.model.predictor import Predictor

    cfg = config.load()
    predictor = Predictor(args.weights, max_batch=max(batches), top_k=cfg.model.top_k,
                          threads=args.threads, backend=args.backend)
    load_s = time.perf_counter() - started
    pixels = np.stack([imaging.decode(p, cfg.imaging) for p in pngs()])[..., None]
    runs = []
    for _ in range(args.runs):
        runs.append({
            "images_per_s": {str(b): throughput(predictor, pixels, b, args.seconds) for b in batches},
            "single_image": latency(predictor, pixels, args.latency_calls),
        })
    costs = request_costs(predictor, cfg)
    from fmnist.runtime import cpu_threads

    print(json.dumps({"backend": predictor.backend, "threads": cpu_threads(args.threads),
                      "load_and_warm_s": load_s,
                      "runs": runs, "per_request_us": costs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
