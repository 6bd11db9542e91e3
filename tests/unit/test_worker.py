"""The serve loop's logic against in-memory doubles: batching, ordering, errors, at-least-once."""

from __future__ import annotations

import dataclasses
import gc
import io
import json
import time
import weakref

import numpy as np
import pytest
from PIL import Image

from fmnist import config
from fmnist.brokers.base import OutMessage
from fmnist.errors import BrokerError
from fmnist.serving.handler import PredictionHandler
from fmnist.serving.worker import Worker
from tests.fakes import BrightnessPredictor, MemoryBroker

REQ, RES, DLQ = "req_predict", "res_predict", "req_predict.dlq"


def png(brightness: int) -> bytes:
    pixels = np.zeros((28, 28), np.uint8)
    pixels[10:18, 10:18] = brightness
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def cfg() -> config.Config:
    return config.load(env={}, flags={"serve.max_wait_ms": 0, "serve.max_batch_size": 8,
                                      "serve.commit_every_ms": 0})  # commit every batch


def with_commit_every(cfg: config.Config, ms: float) -> config.Config:
    return dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, commit_every_ms=ms))


def make_worker(cfg: config.Config, predictor: BrightnessPredictor | None = None):
    broker = MemoryBroker()
    broker.ensure_topics([REQ, RES, DLQ])
    handler = PredictionHandler(cfg, predictor or BrightnessPredictor(), worker_id="w1")
    worker = Worker(cfg, broker, handler, group="g")
    return worker, broker, broker.consumer(REQ, group="g"), broker.producer()


def request(value: bytes, rid: str | None = None, **headers: str) -> OutMessage:
    if rid:
        headers["request_id"] = rid
    return OutMessage(REQ, value, headers=headers)


def serve_all(worker: Worker, consumer, producer) -> None:
    """Turn the pipeline until nothing is left: every request answered and committed."""
    while worker.serve_once(consumer, producer):
        pass


def answers(broker: MemoryBroker) -> list[dict]:
    return [json.loads(m.value) for m in broker.topics[RES]]


def test_each_request_gets_its_own_prediction_under_its_own_id(cfg) -> None:
    worker, broker, consumer, producer = make_worker(cfg)
    producer.publish([request(png(25 * k + 5), f"id-{k}") for k in range(10)], 1)
    while worker.serve_once(consumer, producer):
        pass
    got = {a["request_id"]: a for a in answers(broker)}
    assert sorted(got) == sorted(f"id-{k}" for k in range(10))
    for k in range(10):
        assert got[f"id-{k}"]["label"] == k
        assert got[f"id-{k}"]["status"] == "ok"
        assert got[f"id-{k}"]["model"] == {"name": "fake", "version": "000000000000"}
    assert [m.key for m in broker.topics[RES]] == [f"id-{k}" for k in range(10)]
    assert broker.committed[(REQ, "g")] == 10
    assert broker.topics[DLQ] == []


def test_requests_are_batched_up_to_max_batch_size(cfg) -> None:
    predictor = BrightnessPredictor()
    worker, broker, consumer, producer = make_worker(cfg, predictor)
    producer.publish([request(png(100)) for _ in range(20)], 1)
    while worker.serve_once(consumer, producer):
        pass
    assert predictor.batches == [8, 8, 4]


def test_request_without_headers_is_answered_under_a_derived_id(cfg) -> None:
    worker, broker, consumer, producer = make_worker(cfg)
    producer.publish([OutMessage(REQ, png(60))], 1)
    serve_all(worker, consumer, producer)
    (answer,) = answers(broker)
    assert answer["request_id"] == f"{REQ}/0/0"
    assert answer["request_id_derived"] is True
    assert answer["label"] == 2


def test_bad_requests_get_error_answers_and_dead_letters_without_hurting_neighbours(cfg) -> None:
    worker, broker, consumer, producer = make_worker(cfg)
    producer.publish([request(png(30), "good-1"), request(b"", "empty"),
                      request(b"\x00garbage" * 10, "garbage"), request(png(230), "good-2")], 1)
    serve_all(worker, consumer, producer)
    got = {a["request_id"]: a for a in answers(broker)}
    assert got["good-1"]["label"] == 1 and got["good-2"]["label"] == 9
    assert got["empty"]["status"] == "error"
    assert got["empty"]["error"]["code"] == "empty_payload"
    assert got["garbage"]["error"]["code"] == "unsupported_format"
    assert "label" not in got["garbage"]
    dlq = {m.headers["dlq_request_id"]: m for m in broker.topics[DLQ]}
    assert sorted(dlq) == ["empty", "garbage"]
    assert dlq["garbage"].value == b"\x00garbage" * 10  # original bytes kept
    assert dlq["garbage"].headers["dlq_error_code"] == "unsupported_format"
    assert dlq["garbage"].headers["dlq_source"] == f"{REQ}/0/2"
    assert dlq["garbage"].headers["dlq_worker_id"] == "w1"
    assert broker.committed[(REQ, "g")] == 4


def test_model_failure_answers_every_request_with_an_error(cfg) -> None:
    worker, broker, consumer, producer = make_worker(cfg, BrightnessPredictor(fail=True))
    producer.publish([request(png(30), f"r{i}") for i in range(3)], 1)
    serve_all(worker, consumer, producer)
    codes = [a["error"]["code"] for a in answers(broker)]
    assert codes == ["internal_error"] * 3
    assert len(broker.topics[DLQ]) == 3


def test_failed_publish_commits_nothing_and_redelivers(cfg) -> None:
    worker, broker, consumer, producer = make_worker(cfg)
    producer.publish([request(png(30), "a"), request(png(60), "b")], 1)
    broker.fail_publishes = 1
    assert worker.serve_once(consumer, producer) == 2  # decoded, forward pass dispatched
    with pytest.raises(BrokerError):
        worker.serve_once(consumer, producer)  # nothing new: sends, the confirmation fails
    assert (REQ, "g") not in broker.committed
    assert broker.topics[RES] == []
    assert worker.stats.redelivered == 2
    serve_all(worker, consumer, producer)  # delivered again, answered
    assert sorted(a["request_id"] for a in answers(broker)) == ["a", "b"]
    assert broker.committed[(REQ, "g")] == 2


def test_the_pipeline_answers_a_full_batch_one_turn_later_and_commits_it_after_that(cfg
                                                                                     ) -> None:
    worker, broker, consumer, producer = make_worker(cfg)
    producer.publish([request(png(30), f"r{i}") for i in range(20)], 1)
    assert worker.serve_once(consumer, producer) == 8  # batch 1 prepared
    assert answers(broker) == []
    assert worker.serve_once(consumer, producer) == 8  # batch 2 prepared, batch 1 sent...
    assert len(answers(broker)) == 8
    assert (REQ, "g") not in broker.committed  # ...but not committed before it is confirmed
    assert worker.serve_once(consumer, producer) == 4  # batch 2 sent; batch 3 is not full:
    assert len(answers(broker)) == 20  # sent at once (nothing to overlap with)
    assert broker.committed[(REQ, "g")] == 16  # batches 1 and 2 confirmed and committed
    assert worker.stats.processed == 16
    assert worker.serve_once(consumer, producer) == 0  # nothing new: everything settled
    assert [a["request_id"] for a in answers(broker)] == [f"r{i}" for i in range(20)]
    assert broker.committed[(REQ, "g")] == 20
    assert worker.stats.processed == 20


def test_a_batch_that_is_not_full_is_answered_in_the_turn_that_fetched_it(cfg) -> None:
    worker, broker, consumer, producer = make_worker(cfg)
    producer.publish([request(png(30), "alone")], 1)
    assert worker.serve_once(consumer, producer) == 1
    assert [a["request_id"] for a in answers(broker)] == ["alone"]


def test_an_unconfirmed_batch_is_redelivered_with_every_batch_after_it(cfg) -> None:
    worker, broker, consumer, producer = make_worker(cfg)
    producer.publish([request(png(30), f"r{i}") for i in range(20)], 1)
    broker.fail_publishes = 1  # batch 1 (r0..r7) is lost; batches 2 and 3 get through
    assert worker.serve_once(consumer, producer) == 8
    assert worker.serve_once(consumer, producer) == 8  # batch 1 sent
    with pytest.raises(BrokerError):
        worker.serve_once(consumer, producer)  # batch 2 sent, then batch 1 fails to confirm
    assert (REQ, "g") not in broker.committed  # batch 2's commit would have covered batch 1
    assert worker.stats.redelivered == 20  # batches 1 and 2 in flight, 3 prepared
    serve_all(worker, consumer, producer)
    ids = [a["request_id"] for a in answers(broker)]
    assert sorted(set(ids)) == sorted(f"r{i}" for i in range(20))  # all answered...
    assert ids.count("r8") == 2  # ...batch 2 twice: at-least-once, same request_id
    assert broker.committed[(REQ, "g")] == 20


def test_stop_drains_the_pipeline(cfg) -> None:
    worker, broker, _, producer = make_worker(cfg)
    producer.publish([request(png(30), f"r{i}") for i in range(20)], 1)
    worker.observers.append(lambda messages, result: worker.stop())
    worker.run()  # stops after the first batch is committed, with two more under way
    assert len(answers(broker)) == 20
    assert broker.committed[(REQ, "g")] == 20


def test_commits_wait_for_commit_every_ms_and_an_idle_worker_still_makes_them(cfg) -> None:
    worker, broker, consumer, producer = make_worker(with_commit_every(cfg, 200))
    idle_waits: list[float] = []
    fetch = consumer.next_batch

    def recording(max_messages: int, timeout_s: float):
        idle_waits.append(timeout_s)
        return fetch(max_messages, timeout_s)

    consumer.next_batch = recording
    producer.publish([request(png(30), f"r{i}") for i in range(3)], 1)
    started = time.monotonic()
    serve_all(worker, consumer, producer)
    assert len(answers(broker)) == 3 and worker.stats.processed == 3  # answered, confirmed...
    assert (REQ, "g") not in broker.committed  # ...and the commit is not due yet
    # Idle now: a fetch waits no longer than until the commit is due, so it is made on time
    # (the idle wait is 0.2 s; this one is shorter by the time already spent).
    assert worker.serve_once(consumer, producer) == 0
    assert 0 < idle_waits[-1] < 0.2
    while (REQ, "g") not in broker.committed and time.monotonic() - started < 5:
        worker.serve_once(consumer, producer)
    assert broker.committed[(REQ, "g")] == 3
    assert time.monotonic() - started >= 0.2


def test_a_batch_worth_of_confirmed_requests_is_committed_without_waiting(cfg) -> None:
    worker, broker, consumer, producer = make_worker(with_commit_every(cfg, 60_000))
    producer.publish([request(png(30), f"r{i}") for i in range(20)], 1)
    serve_all(worker, consumer, producer)
    assert broker.committed[(REQ, "g")] == 16  # batches 1 and 2 (>= max_batch_size 8)
    worker.flush(consumer, producer)  # what stop does: the rest is committed at once
    assert broker.committed[(REQ, "g")] == 20


def test_a_failed_confirmation_commits_what_was_confirmed_before_it(cfg) -> None:
    worker, broker, consumer, producer = make_worker(with_commit_every(cfg, 60_000))
    producer.publish([request(png(30), f"r{i}") for i in range(20)], 1)
    assert worker.serve_once(consumer, producer) == 8
    assert worker.serve_once(consumer, producer) == 8  # batch 1 sent
    broker.fail_publishes = 1  # batch 2 (r8..r15) is lost
    with pytest.raises(BrokerError):
        worker.serve_once(consumer, producer)  # batch 1 confirmed, then batch 2 fails
    assert broker.committed[(REQ, "g")] == 8  # batch 1 answered: committed, not re-answered
    assert worker.stats.redelivered == 12  # batches 2 and 3
    serve_all(worker, consumer, producer)
    worker.flush(consumer, producer)
    ids = [a["request_id"] for a in answers(broker)]
    assert sorted(set(ids)) == sorted(f"r{i}" for i in range(20))
    assert ids.count("r0") == 1 and ids.count("r16") == 2  # batch 3 was sent before the failure
    assert broker.committed[(REQ, "g")] == 20


def test_a_hand_back_whose_commit_fails_still_redelivers_and_says_so(cfg, caplog) -> None:
    worker, broker, consumer, producer = make_worker(with_commit_every(cfg, 60_000))
    producer.publish([request(png(30), f"r{i}") for i in range(20)], 1)
    worker.serve_once(consumer, producer)
    worker.serve_once(consumer, producer)  # batch 1 sent
    broker.fail_publishes, broker.fail_commits = 1, 1  # batch 2 lost, and the commit fails
    with pytest.raises(BrokerError):
        worker.serve_once(consumer, producer)
    assert (REQ, "g") not in broker.committed
    assert worker.stats.redelivered == 12
    assert "could not commit 8 answered request(s)" in caplog.text
    serve_all(worker, consumer, producer)
    worker.flush(consumer, producer)
    ids = [a["request_id"] for a in answers(broker)]
    assert sorted(set(ids)) == sorted(f"r{i}" for i in range(20))  # nothing lost
    assert broker.committed[(REQ, "g")] == 20


def test_run_survives_broker_errors_and_keeps_serving(cfg) -> None:
    worker, broker, _, producer = make_worker(cfg)
    producer.publish([request(png(30), "x")], 1)
    broker.fail_publishes = 2
    observed = []

    def stop_when_answered(messages, result) -> None:
        observed.append(result.outcomes)
        worker.stop()

    worker.observers.append(stop_when_answered)
    worker.run()  # backs off twice (0.5 s, 1 s), then answers and stops
    assert observed == [["ok"]]
    assert [a["request_id"] for a in answers(broker)] == ["x"]


def test_timings_and_trace_context_are_carried(cfg) -> None:
    worker, broker, consumer, producer = make_worker(cfg)
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    producer.publish([request(png(30), "t", sent_at="1700000000000", traceparent=trace)], 1)
    serve_all(worker, consumer, producer)
    (message,) = broker.topics[RES]
    body = json.loads(message.value)
    assert message.headers["traceparent"] == trace
    assert message.headers["request_id"] == "t"
    assert body["timings_ms"]["total"] > 0
    assert body["timings_ms"]["inference"] >= 0


def test_invalid_headers_and_reply_to_are_errors_answered_on_the_response_topic(cfg) -> None:
    worker, broker, consumer, producer = make_worker(cfg)
    producer.publish([request(png(30), "x" * 500), request(png(30), "r1", reply_to=REQ),
                      request(png(30), "r2", sent_at="yesterday"),
                      request(png(30), "r3", reply_to=f"{RES}.client7")], 1)
    serve_all(worker, consumer, producer)
    got = {a["request_id"]: a for a in answers(broker)}
    assert got[f"{REQ}/0/0"]["error"]["code"] == "invalid_headers"
    assert got["r1"]["error"]["code"] == "invalid_reply_to"
    assert got["r2"]["error"]["code"] == "invalid_headers"
    assert "r3" not in got  # went to its own reply topic
    (private,) = broker.topics[f"{RES}.client7"]
    assert json.loads(private.value)["status"] == "ok"


def oip_request(rid: str, body: object) -> OutMessage:
    return OutMessage(REQ, json.dumps(body).encode(),
                      headers={"request_id": rid, "content_type": "application/json"})


def test_open_inference_protocol_requests_share_the_batch_and_get_oip_answers(cfg) -> None:
    predictor = BrightnessPredictor()
    worker, broker, consumer, producer = make_worker(cfg, predictor)
    images = np.zeros((3, 28, 28), np.uint8)
    images[0, 5, 5], images[1, 5, 5], images[2, 5, 5] = 30, 130, 230
    producer.publish([
        oip_request("oip-1", {"id": "mine", "inputs": [{"name": "pixels", "shape": [3, 28, 28],
                                                       "datatype": "UINT8",
                                                       "data": images.ravel().tolist()}]}),
        request(png(60), "raw-1"),
        oip_request("oip-2", {"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32",
                                         "data": [200.0] * 784}]}),
    ], 1)
    serve_all(worker, consumer, producer)
    assert predictor.batches == [5]  # 3 + 1 + 1 rows in one forward pass
    by_id = {m.headers["request_id"]: json.loads(m.value) for m in broker.topics[RES]}
    first = by_id["oip-1"]
    assert first["id"] == "mine" and first["model_name"] == "fake"
    labels = next(o for o in first["outputs"] if o["name"] == "label")
    assert labels["data"] == [1, 5, 9] and labels["shape"] == [3]
    probs = next(o for o in first["outputs"] if o["name"] == "probabilities")
    assert probs["shape"] == [3, 10] and probs["datatype"] == "FP32"
    assert by_id["oip-2"]["id"] == "oip-2"
    assert next(o for o in by_id["oip-2"]["outputs"] if o["name"] == "label")["data"] == [8]
    assert by_id["raw-1"]["label"] == 2


@pytest.mark.parametrize("body, fragment", [
    ({"inputs": []}, "non-empty"),
    ({"inputs": [{"shape": [1, 27, 27], "datatype": "UINT8", "data": [0] * 729}]}, "shape"),
    ({"inputs": [{"shape": [1, 784], "datatype": "INT8", "data": [0] * 784}]}, "datatype"),
    ({"inputs": [{"shape": [2, 784], "datatype": "FP32", "data": [0] * 784}]}, "needs 1568"),
    ({"inputs": [{"shape": [1, 784], "datatype": "FP32", "data": [300.0] * 784}]}, "0..255"),
    ("not an object", "inputs"),
])
def test_malformed_oip_bodies_get_oip_errors_and_dead_letters(cfg, body, fragment) -> None:
    worker, broker, consumer, producer = make_worker(cfg)
    producer.publish([oip_request("bad", body), request(png(30), "fine")], 1)
    serve_all(worker, consumer, producer)
    by_id = {m.headers["request_id"]: (m, json.loads(m.value)) for m in broker.topics[RES]}
    message, answer = by_id["bad"]
    assert list(answer) == ["error"] and fragment in answer["error"]
    assert message.headers["error_code"] == "invalid_request"
    assert by_id["fine"][1]["label"] == 1
    assert [m.headers["dlq_error_code"] for m in broker.topics[DLQ]] == ["invalid_request"]


def test_dead_letters_are_bounded_so_the_broker_always_takes_them(cfg) -> None:
    worker, broker, consumer, producer = make_worker(cfg)
    cap = cfg.imaging.max_payload_bytes
    headers = {f"h{i:03d}": "v" for i in range(200)}
    headers["request_id"] = "big"
    producer.publish([OutMessage(REQ, b"\x89PNG" + b"\0" * (cap + 5000), headers=headers)], 1)
    serve_all(worker, consumer, producer)
    (letter,) = broker.topics[DLQ]
    assert len(letter.value) == cap
    assert letter.headers["dlq_payload_bytes"] == str(cap + 5004)
    assert letter.headers["dlq_error_code"] == "invalid_headers"  # 201 headers: checked first
    assert letter.headers["request_id"] == "big"  # protocol headers kept first
    assert len([k for k in letter.headers if not k.startswith("dlq_")]) <= 64


def test_the_heap_is_frozen_at_start_and_a_model_swapped_out_is_still_collected(cfg) -> None:
    broker = MemoryBroker()
    broker.ensure_topics([REQ, RES, DLQ])
    old = BrightnessPredictor()
    old.itself = old  # a reference cycle, as a Keras model has: only the cyclic GC frees it
    gone = weakref.ref(old)
    handler = PredictionHandler(cfg, old, worker_id="w1")
    worker = Worker(cfg, broker, handler, group="g", freeze_heap=True)
    consumer, producer = broker.consumer(REQ, group="g"), broker.producer()
    gc.unfreeze()
    try:
        worker.serve_once(consumer, producer)
        assert gc.get_freeze_count() > 0  # the model is out of the collector's scans
        handler.predictor = BrightnessPredictor()  # a hot reload swaps the model
        del old
        worker.serve_once(consumer, producer)
        assert gone() is None  # unfrozen, collected, and the heap frozen again
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
