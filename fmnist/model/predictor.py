"""Load weights once, compile one forward pass, predict batches: the serving hot path.

`model.predict` costs ~60x more than a compiled call at batch 1 (it builds a data pipeline per
call), so the worker never uses it. We compile the forward pass once per backend for a handful
of power-of-two "bucket" shapes, so a backend that specialises on shape (JAX, XLA) compiles
during warm-up and never on the hot path.

Cost is not monotonic in the shape: XLA on this CPU runs the 7.7 M multiply-add network at
114 us per image at batch 16 and 80 us at 256, but 356 us at 64 (docs/decisions.md#batch-shape-plan). So
warm-up times every bucket and ``plan`` decides, for each batch size, the cheapest way to cover
it: one padded call, or several calls (64 images = 4 calls of 16, 7 ms instead of 23 ms).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmnist.config import Config
from fmnist.data import CLASS_NAMES
from fmnist.model import artifacts, calibration


@dataclass(slots=True)  # one per answer: no frozen __init__ (docs/decisions.md#per-batch-bookkeeping)
class Prediction:
    label: int
    class_name: str
    confidence: float
    top_k: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "class_name": self.class_name,
                "confidence": self.confidence, "top_k": self.top_k}


def buckets(max_batch: int) -> list[int]:
    """Powers of two up to (and including) max_batch: the shapes we compile."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch]


def plan(costs: dict[int, float], max_batch: int) -> list[list[int]]:
    """For each n in 0..max_batch, the bucket sizes whose calls cover n images at the lowest
    total cost (the last call padded). ``costs`` maps bucket size -> seconds per call."""
    best: list[tuple[float, list[int]]] = [(0.0, [])]
    for n in range(1, max_batch + 1):
        options = [(cost, [size]) for size, cost in costs.items() if size >= n]
        options += [(cost + best[n - size][0], [size, *best[n - size][1]])
                    for size, cost in costs.items() if size < n]
        best.append(min(options, key=lambda option: option[0]))
    return [calls for _, calls in best]


Collect = Callable[[], np.ndarray]


def compile_forward(model: Any) -> Callable[[np.ndarray], Collect]:
    """A compiled forward pass for the active Keras backend: ``dispatch(pixels)`` starts it and
    returns ``collect()``, which waits for the probabilities. On JAX the pass runs on XLA's
    threads in between (JAX dispatches asynchronously), so the caller can do other work while
    it runs; the other backends compute inside ``dispatch``."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        spec = tf.TensorSpec([None, 28, 28, 1], tf.float32)
        fn = tf.function(lambda x: model(x, training=False), input_signature=[spec],
                         jit_compile=False,  # XLA measured slower for this model on CPU
                         autograph=False)  # nothing to convert; autograph litters /tmp
        return lambda x: _ready(fn(tf.constant(x)).numpy())
    if backend == "jax":
        import jax

        state = ([v.value for v in model.trainable_variables],
                 [v.value for v in model.non_trainable_variables])
        jitted = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=False)[0])

        def dispatch(x: np.ndarray) -> Collect:
            running = jitted(state[0], state[1], x)
            return lambda: np.asarray(running)
        return dispatch
    return lambda x: _ready(np.asarray(keras.ops.convert_to_numpy(model(x, training=False))))


def _ready(probs: np.ndarray) -> Collect:
    return lambda: probs


class Predictor:
    """A loaded, warmed model. ``predict`` is thread-safe (one forward pass at a time)."""

    def __init__(self, weights: Path, max_batch: int = 64, top_k: int = 3, threads: int = 0,
                 backend: str = "auto", compile_cache: str = "") -> None:
        from fmnist.runtime import jax_compile_cache, keras_module, select_backend

        self.backend = select_backend(backend, threads)
        if self.backend == "jax":
            jax_compile_cache(compile_cache)
        keras_module(threads)
        started = time.perf_counter()
        model, self.meta = artifacts.load_model(weights)
        self.weights = weights
        self.name: str = self.meta.get("name", weights.stem)
        self.version: str = self.meta["version"]
        # Temperature scaling fitted after training (1.0 for models saved without it).
        self.temperature = float((self.meta.get("calibration") or {}).get("temperature", 1.0))
        self.max_batch = max_batch
        self.top_k = top_k
        self._forward = compile_forward(model)
        self._lock = threading.Lock()
        self.bucket_ms: dict[int, float] = {}
        self._plan: list[list[int]] = []
        self.warm_up()
        self.load_seconds = time.perf_counter() - started

    @classmethod
    def configured(cls, cfg: Config, max_batch: int, weights: Path | None = None) -> Predictor:
        """The predictor every command builds: ``cfg``'s model (or ``weights``), top-k, inference
        threads, backend and compile cache."""
        return cls(weights or cfg.weights_path, max_batch=max_batch, top_k=cfg.model.top_k,
                   threads=cfg.serve.threads, backend=cfg.serve.backend,
                   compile_cache=cfg.serve.compile_cache)

    def warm_up(self, timed_calls: int = 3) -> None:
        """Run every bucket shape (so nothing compiles while serving), time it, and plan."""
        costs = {}
        for size in buckets(self.max_batch):
            zeros = np.zeros((size, 28, 28, 1), np.float32)
            probs = self._forward(zeros)()
            if probs.shape != (size, len(CLASS_NAMES)) or not np.all(np.isfinite(probs)):
                from fmnist.errors import ModelError

                raise ModelError(f"{self.weights} produced {probs.shape} non-finite or misshaped "
                                 "output in its warm-up prediction.", artifacts.TRAIN_HINT)
            timings = []
            for _ in range(timed_calls):  # the best of a few: start-up is a noisy time
                started = time.perf_counter()
                self._forward(zeros)()
                timings.append(time.perf_counter() - started)
            costs[size] = min(timings)
        self.bucket_ms = {size: round(cost * 1000, 3) for size, cost in costs.items()}
        self._plan = plan(costs, self.max_batch)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """[N, 28, 28] or [N, 28, 28, 1] float32 pixels (0..255) -> [N, 10] probabilities."""
        return self.start(pixels)()

    def start(self, pixels: np.ndarray) -> Collect:
        """``probabilities`` in two steps: dispatch the forward passes now (the batch plan's
        calls, the last one padded), wait for them in the returned ``collect()``."""
        pixels = np.asarray(pixels, np.float32).reshape(-1, 28, 28, 1)
        calls: list[tuple[int, int, Collect]] = []
        start = 0
        with self._lock:
            while start < len(pixels):
                for size in self._plan[min(self.max_batch, len(pixels) - start)]:
                    chunk = pixels[start:start + size]
                    n = len(chunk)
                    if n != size:
                        chunk = np.concatenate([chunk, np.zeros((size - n, 28, 28, 1),
                                                                np.float32)])
                    calls.append((start, n, self._forward(chunk)))
                    start += n

        def collect() -> np.ndarray:
            out = np.empty((len(pixels), len(CLASS_NAMES)), np.float32)
            for first, n, wait in calls:
                out[first:first + n] = wait()[:n]
            return out if self.temperature == 1.0 else calibration.soften(out, self.temperature)
        return collect

    def predict(self, pixels: np.ndarray) -> list[Prediction]:
        return self.describe_many(self.probabilities(pixels))

    def describe(self, probs: np.ndarray) -> Prediction:
        return rank(probs, self.top_k)

    def describe_many(self, probs: np.ndarray) -> list[Prediction]:
        """``describe`` for each row of [N, 10] probabilities, in one ranking."""
        return rank_many(probs, self.top_k)


def rank(probs: np.ndarray, top_k: int) -> Prediction:
    """One image's probabilities -> its ``top_k`` classes, most probable first, rounded to 6
    decimals."""
    return rank_many(probs.reshape(1, -1), top_k)[0]


def rank_many(probs: np.ndarray, top_k: int) -> list[Prediction]:
    """``rank`` for each row of [N, 10] probabilities. One ``argsort`` and one ``tolist`` for
    the batch, then Python ints and floats rather than numpy scalars: 2-5 us less per answer
    than a call per row (docs/decisions.md#ranked-batch), the same order (ties too) and values."""
    orders = probs.argsort(axis=1)[:, ::-1][:, :top_k]
    top_values = round6(np.take_along_axis(probs, orders, axis=1))
    names = CLASS_NAMES
    out = []
    for order, values in zip(orders.tolist(), top_values, strict=True):
        top = [{"label": i, "class_name": names[i], "probability": v}
               for i, v in zip(order, values, strict=True)]
        out.append(Prediction(order[0], names[order[0]], values[0], top))
    return out


def round6(values: np.ndarray) -> list[list[float]]:
    """``round(float(v), 6)`` of each value of a 2-D array, as nested lists, in a few array
    operations rather than a ``round`` call each (0.4 us apiece, three per answer).

    ``round`` gives the double nearest the decimal rounded half-even. ``rint(v * 1e6) / 1e6``
    is that same double wherever ``v * 1e6`` is not within float error of a tie: ``rint``
    then picks the same integer n, and n / 1e6 (both exact) is correctly rounded by IEEE
    division. The values near a tie go through ``round`` itself."""
    exact = np.asarray(values, np.float64)
    scaled = exact * 1e6
    nearest = np.rint(scaled)
    rounded = nearest / 1e6
    near_tie = np.abs(np.abs(scaled - nearest) - 0.5) < 1e-6
    if near_tie.any():
        for i, j in zip(*np.nonzero(near_tie), strict=True):
            rounded[i, j] = round(float(exact[i, j]), 6)
    return rounded.tolist()
