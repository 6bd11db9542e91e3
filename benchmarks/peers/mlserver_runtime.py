"""An MLServer runtime serving weights/fmnist.keras on JAX: the peer in benchmarks/peers.py.

Runs inside `.venvs/mlserver` (MLServer is not a dependency of fmnist, so nothing here imports
fmnist). It is written as MLServer's best case, with what fmnist's own predictor does:

- the forward pass is one ``jax.jit`` of Keras' ``stateless_call`` (never ``model.predict``,
  which builds a data pipeline per call);
- batches are padded to power-of-two shapes up to the model's ``max_batch_size``, all compiled
  and run once in ``load``, so nothing compiles while serving;
- the answer is the same Open Inference Protocol response fmnist gives: ``probabilities``
  [n, 10] FP32 (temperature-scaled as fmnist's meta.json says) and ``label`` [n] INT64.

MLServer's adaptive batching (``max_batch_size`` / ``max_batch_time`` in model-settings.json)
concatenates the rows of queued requests along the first axis before ``predict`` and splits the
flattened outputs back by each request's row count (mlserver/batching/requests.py), so
``predict`` sees [k, 28, 28] for k rows from one or more requests.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import keras
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


def buckets(max_batch: int) -> list[int]:
    """Powers of two up to max_batch, as fmnist.model.predictor.buckets compiles: the same
    shapes for the peer. A copy, since MLServer's virtualenv has no fmnist in it."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch]


class FmnistRuntime(MLModel):
    async def load(self) -> bool:
        weights = Path(self.settings.parameters.uri)
        meta = json.loads(weights.with_suffix(".meta.json").read_text())
        self.temperature = float((meta.get("calibration") or {}).get("temperature", 1.0))
        model = keras.saving.load_model(weights, compile=False)
        state = ([v.value for v in model.trainable_variables],
                 [v.value for v in model.non_trainable_variables])
        jitted = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=False)[0])
        self._forward = lambda x: np.asarray(jitted(state[0], state[1], x))
        self.buckets = buckets(max(1, self.settings.max_batch_size))
        for size in self.buckets:  # compile every shape now, none while serving
            self._forward(np.zeros((size, 28, 28, 1), np.float32))
        return True

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        out = np.empty((len(pixels), 10), np.float32)
        start = 0
        while start < len(pixels):
            n = min(len(pixels) - start, self.buckets[-1])
            size = next(b for b in self.buckets if b >= n)
            chunk = np.zeros((size, 28, 28, 1), np.float32)
            chunk[:n] = pixels[start:start + n]
            out[start:start + n] = self._forward(chunk)[:n]
            start += n
        if self.temperature != 1.0:  # softmax(log(p) / T), as fmnist.model.calibration
            logits = np.log(np.clip(out.astype(np.float64), 1e-12, 1.0)) / self.temperature
            logits -= logits.max(axis=1, keepdims=True)
            out = np.exp(logits)
            out = (out / out.sum(axis=1, keepdims=True)).astype(np.float32)
        return out

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        pixels = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        probs = self.probabilities(pixels.reshape(-1, 28, 28, 1))
        return InferenceResponse(
            model_name=self.name, model_version=self.version, id=payload.id,
            outputs=[NumpyCodec.encode_output("probabilities", probs),
                     NumpyCodec.encode_output("label", probs.argmax(axis=1).astype(np.int64))])
