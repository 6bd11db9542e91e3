"""Open Inference Protocol (KServe v2) bodies over the broker.

A request whose content type is ``application/json`` carries an OIP inference request; its
tensor rows join the same micro-batch as raw image requests, and the answer is an OIP
inference response, so clients written for KServe, Seldon or Triton can talk to fmnist through
Kafka or Pub/Sub. Malformed bodies are answered ``{"error": ...}`` (OIP's error shape) and get
the same dead-lettering as any bad request.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import orjson

from fmnist.serving.protocol import RequestError

CONTENT_TYPES = ("application/json", "application/vnd.oip+json")
DATATYPES = {"UINT8": np.uint8, "FP32": np.float32}
MAX_ROWS = 256


def is_oip(content_type: str, payload: bytes) -> bool:
    return _oip_type(content_type)


@functools.lru_cache(maxsize=256)  # asked per request; a worker sees a handful of types
def _oip_type(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() in CONTENT_TYPES


def parse(payload: bytes) -> tuple[str | None, np.ndarray]:
    """An OIP inference request -> (its id, pixels [N, 28, 28] float32 in 0..255)."""
    try:  # orjson: a sixth of json.loads's time for 784 numbers (docs/decisions.md#oip-orjson)
        body = orjson.loads(payload)
    # orjson's JSONDecodeError, a ValueError: bad JSON or UTF-8, nesting deeper than 1024
    # levels, a number beyond float64. Uncaught, it would leave as internal_error, not the
    # client's invalid_request.
    except ValueError as exc:
        raise RequestError("invalid_request", f"body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise RequestError("invalid_request", "an inference request needs a non-empty `inputs` list")
    tensor = body["inputs"][0]
    if not isinstance(tensor, dict):
        raise RequestError("invalid_request", "`inputs[0]` must be an object")
    shape, datatype, data = tensor.get("shape"), tensor.get("datatype"), tensor.get("data")
    if not isinstance(datatype, str) or datatype not in DATATYPES:  # a list is unhashable
        raise RequestError("invalid_request", f"datatype must be one of {sorted(DATATYPES)}, "
                                              f"got {datatype!r}")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape)
            or tuple(shape[1:]) not in ((28, 28), (784,), (28, 28, 1))):
        raise RequestError("invalid_request", f"shape must be [N,28,28], [N,784] or [N,28,28,1], "
                                              f"got {shape!r}")
    if shape[0] > MAX_ROWS:
        raise RequestError("invalid_request", f"at most {MAX_ROWS} images per request, got {shape[0]}")
    try:
        array = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float64
        raise RequestError("invalid_request", "`data` must be numbers") from None
    if array.size != int(np.prod(shape)):
        raise RequestError("invalid_request", f"`data` holds {array.size} values, shape {shape} "
                                              f"needs {int(np.prod(shape))}")
    if not np.all(np.isfinite(array)) or array.min(initial=0) < 0 or array.max(initial=0) > 255:
        raise RequestError("invalid_request", "pixel values must be finite and within 0..255")
    if datatype == "UINT8" and not np.all(array == np.round(array)):
        raise RequestError("invalid_request", "UINT8 data must be whole numbers")
    request_id = body.get("id")
    return (str(request_id) if request_id is not None else None,
            array.reshape(shape[0], 28, 28).astype(np.float32))


def response(model_name: str, model_version: str, request_id: str,
             probabilities: np.ndarray) -> dict[str, Any]:
    n = len(probabilities)
    return {
        "model_name": model_name,
        "model_version": model_version,
        "id": request_id,
        "outputs": [
            {"name": "probabilities", "shape": [n, probabilities.shape[1]], "datatype": "FP32",
             "data": [round(float(p), 6) for p in probabilities.ravel()]},
            {"name": "label", "shape": [n], "datatype": "INT64",
             "data": [int(i) for i in probabilities.argmax(axis=1)]},
        ],
    }
