"""The answer on the wire: ``predictor.rank``'s top-k and ``protocol.response``'s exact bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fmnist.brokers.base import Message
from fmnist.data import CLASS_NAMES
from fmnist.model.predictor import Prediction, rank, rank_many, round6
from fmnist.serving import protocol

MODEL = {"name": "fmnist", "version": "abc123"}
RECEIVED_AT = 1_700_000_000.125  # seconds; the worker finishes 125 ms later
FINISHED_MS = 1_700_000_000_250
PROBS = np.array([0.01, 0.0234567891, 0.05, 0.0, 0.1, 0.0, 0.07, 0.0365432109, 0.1234567, 0.0],
                 np.float32)
PROBS[3] = 1 - PROBS.sum()  # Dress, the most probable


def numpy_rank(probs: np.ndarray, top_k: int) -> Prediction:
    """How ``Predictor.describe`` ranked before it moved to Python ints and floats."""
    order = np.argsort(probs)[::-1][:top_k]
    top = [{"label": int(i), "class_name": CLASS_NAMES[i],
            "probability": round(float(probs[i]), 6)} for i in order]
    return Prediction(int(order[0]), CLASS_NAMES[int(order[0])],
                      round(float(probs[order[0]]), 6), top)


def test_rank_orders_the_top_k_and_rounds_to_six_decimals() -> None:
    assert rank(PROBS, 3) == Prediction(3, "Dress", 0.586543, [
        {"label": 3, "class_name": "Dress", "probability": 0.586543},
        {"label": 8, "class_name": "Bag", "probability": 0.123457},
        {"label": 4, "class_name": "Coat", "probability": 0.1}])
    assert rank(PROBS, 1).top_k == [{"label": 3, "class_name": "Dress", "probability": 0.586543}]


@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_rank_is_numpys_ranking_ties_included(top_k: int) -> None:
    rng = np.random.default_rng(5)
    rows = [*rng.dirichlet(np.ones(10), 500).astype(np.float32),
            *np.round(rng.dirichlet(np.ones(10), 200), 1).astype(np.float32),  # many ties
            np.full(10, 0.1, np.float32), np.eye(10, dtype=np.float32)[7],
            rng.dirichlet(np.ones(10))]  # float64, as calibration.soften returns
    for probs in rows:
        assert rank(probs, top_k) == numpy_rank(probs, top_k), probs


@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_rank_many_ranks_each_row_as_rank_does(top_k: int) -> None:
    rng = np.random.default_rng(6)
    for probs in (rng.dirichlet(np.ones(10), 300).astype(np.float32),
                  np.round(rng.dirichlet(np.ones(10), 300), 1).astype(np.float32),  # ties
                  rng.dirichlet(np.ones(10), 50)):  # float64, as calibration.soften returns
        assert rank_many(probs, top_k) == [rank(row, top_k) for row in probs]
    assert rank_many(np.zeros((0, 10), np.float32), 3) == []


def request(headers: dict[str, str], broker_time_ms: int | None) -> protocol.Request:
    message = Message(b"\x89PNG...", headers, None, "req_predict", "req_predict/0/7",
                      broker_time_ms, RECEIVED_AT)
    parsed, error = protocol.parse_request(message, "res_predict")
    assert error is None
    return parsed


def test_prediction_response_bytes_are_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "now_ms", lambda: FINISHED_MS)
    sent = {"request_id": "req-1", "sent_at": "1699999999875", "traceparent":
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    out = protocol.response(request(sent, 1_699_999_999_990), model=MODEL, worker_id="worker-1",
                            inference_ms=1.23456, prediction=rank(PROBS, 3).as_dict())
    assert out.value == (
        b'{"protocol":"fmnist.v1","request_id":"req-1","request_id_derived":false,"status":"ok",'
        b'"label":3,"class_name":"Dress","confidence":0.586543,"top_k":['
        b'{"label":3,"class_name":"Dress","probability":0.586543},'
        b'{"label":8,"class_name":"Bag","probability":0.123457},'
        b'{"label":4,"class_name":"Coat","probability":0.1}],'
        b'"model":{"name":"fmnist","version":"abc123"},"worker_id":"worker-1",'
        b'"timings_ms":{"queue_wait":250.0,"inference":1.235,"worker":125.0,"total":375}}')
    assert (out.topic, out.key) == ("res_predict", "req-1")
    assert out.headers == {"request_id": "req-1", "content_type": "application/json",
                           "protocol": "fmnist.v1", "traceparent": sent["traceparent"]}


def test_error_response_bytes_are_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "now_ms", lambda: FINISHED_MS)
    error = protocol.RequestError("empty_payload", "The payload is empty (0 bytes).")
    out = protocol.response(request({}, None), model=MODEL, worker_id="worker-1",
                            inference_ms=None, error=error)
    assert out.value == (
        b'{"protocol":"fmnist.v1","request_id":"req_predict/0/7","request_id_derived":true,'
        b'"status":"error","model":{"name":"fmnist","version":"abc123"},"worker_id":"worker-1",'
        b'"timings_ms":{"queue_wait":null,"inference":null,"worker":125.0,"total":null},'
        b'"error":{"code":"empty_payload","message":"The payload is empty (0 bytes)."}}')
    assert out.headers["error_code"] == "empty_payload"


def test_a_response_is_utf8_json_whatever_the_message_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "now_ms", lambda: FINISHED_MS)
    error = protocol.RequestError("undecodable_image", 'Bild "ü" \\ kaputt\n\u2028')
    out = protocol.response(request({"request_id": "r-1"}, None), model=MODEL,
                            worker_id="wörker", inference_ms=None, error=error)
    body = json.loads(out.value.decode("utf-8"))
    assert body["error"] == {"code": "undecodable_image", "message": error.message}
    assert body["worker_id"] == "wörker"


def test_round6_is_pythons_round_near_ties_too() -> None:
    rng = np.random.default_rng(7)
    ties = (np.arange(2000) + 0.5) / 1e6  # within float error of a tie at the 6th decimal
    values = np.concatenate([
        rng.random(200_000).astype(np.float32).astype(np.float64), rng.random(50_000),
        ties, np.nextafter(ties, 0), np.nextafter(ties, 1), [0.0, 1.0, 1e-7, 0.9999995]])
    got = round6(values.reshape(-1, 1))
    assert [row[0] for row in got] == [round(float(v), 6) for v in values]
