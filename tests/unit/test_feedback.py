"""Feedback without a broker: the record format, labels, one record per request, accuracy per
model version, training images, the sent cache, and what the worker and its metrics do with a
labelled request (in-memory doubles)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest

from fmnist import client, config, feedback
from fmnist.brokers.base import Message
from fmnist.errors import MissingArtifactError, UsageError
from fmnist.feedback import Record
from fmnist.serving.metrics import Metrics
from tests.fakes import MemoryBroker
from tests.unit.test_worker import REQ, RES, cfg, make_worker, png, request  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
TOPIC = "fmnist_feedback"


def received(out: object, offset: int = 0) -> Message:
    """An OutMessage as a consumer would hand it out."""
    return Message(out.value, dict(out.headers), out.key, out.topic,  # type: ignore[attr-defined]
                   f"{TOPIC}/0/{offset}", None, 0.0)


def rec(rid: str, label: int, t: int, predicted: int | None = None, version: str | None = None,
        image: bytes = b"img", source: str = "request") -> Record:
    return Record(rid, label, image, source, t, predicted, "fmnist" if version else None,
                  version, "w1" if version else None)


# --- the record format ---

def test_a_record_survives_the_wire_with_every_field() -> None:
    r = Record("req-1", 7, b"\x89PNG...", "request", 1700000000123, 5, "fmnist", "abc123def456",
               "host-1")
    out = feedback.message(TOPIC, r)
    assert (out.topic, out.key, out.value) == (TOPIC, "req-1", b"\x89PNG...")
    assert out.headers == {"schema": "fmnist.feedback/1", "request_id": "req-1", "label": "7",
                           "source": "request", "time": "1700000000123", "predicted": "5",
                           "model_name": "fmnist", "model_version": "abc123def456",
                           "worker_id": "host-1"}
    assert feedback.parse(received(out)) == r


def test_what_nobody_knows_stays_off_the_wire_and_comes_back_as_none() -> None:
    r = Record("req-2", 0, b"x", "feedback", 5)
    out = feedback.message(TOPIC, r)
    assert set(out.headers) == {"schema", "request_id", "label", "source", "time"}
    back = feedback.parse(received(out))
    assert back == r and back is not None and back.correct is None


@pytest.mark.parametrize("change", [{"schema": "other/1"}, {"label": "12"}, {"label": "seven"},
                                    {"request_id": ""}])
def test_anything_else_on_the_topic_is_not_a_record(change: dict[str, str]) -> None:
    out = feedback.message(TOPIC, rec("r", 3, 1))
    msg = received(out)
    assert feedback.parse(dataclasses.replace(msg, headers={**msg.headers, **change})) is None
    assert feedback.parse(dataclasses.replace(msg, value=b"")) is None


# --- labels as people give them ---

@pytest.mark.parametrize(("text", "label"), [
    ("0", 0), ("9", 9), (" 7 ", 7), ("sneaker", 7), ("Ankle boot", 9), ("ANKLE-BOOT", 9),
    ("t-shirt", 0), ("T-shirt/top", 0), ("top", 0), ("bag", 8), ("trouser", 1)])
def test_a_label_is_a_digit_or_a_class_name_in_any_case(text: str, label: int) -> None:
    assert feedback.parse_label(text) == label


@pytest.mark.parametrize("text", ["10", "-1", "", "shoe", "7.0"])
def test_anything_else_is_a_usage_error_listing_the_classes(text: str) -> None:
    with pytest.raises(UsageError) as info:
        feedback.parse_label(text)
    assert info.value.exit_code == 2 and "7 Sneaker" in (info.value.hint or "")


def test_the_wire_takes_exactly_one_digit() -> None:
    assert [feedback.parse_wire_label(t) for t in ("3", "03", "sneaker", " 3", None)] == \
        [3, None, None, None, None]


# --- one record per request, accuracy per version ---

def test_the_newest_label_of_a_request_wins_and_keeps_what_the_model_said() -> None:
    worker = rec("a", 5, 10, predicted=5, version="v1")
    duplicate = rec("a", 5, 11, predicted=5, version="v1")  # at-least-once
    correction = rec("a", 6, 20, source="feedback")  # `fmnist feedback a 6`, without --wait
    other = rec("b", 1, 15, predicted=1, version="v1")
    result = feedback.latest([correction, other, worker, duplicate])
    assert [r.request_id for r in result] == ["b", "a"]
    a = result[1]
    assert (a.label, a.source, a.predicted, a.model_version, a.correct) == \
        (6, "feedback", 5, "v1", False)


def test_accuracy_by_version_counts_each_request_once() -> None:
    records = [rec(f"r{i}", i % 10, i, predicted=i % 10, version="v1") for i in range(6)]
    records += [rec("w1", 3, 100, predicted=4, version="v1"),
                rec("w1", 3, 101, predicted=4, version="v1"),  # a duplicate: counted once
                rec("n1", 2, 102, predicted=2, version="v2"),
                rec("n2", 2, 103, predicted=8, version="v2"),
                rec("n3", 2, 104, predicted=8, version="v2"),
                rec("unknown", 2, 105)]  # no prediction known: counted nowhere
    assert feedback.accuracy_by_version(records) == {
        "v1": {"name": "fmnist", "labelled": 7, "correct": 6, "accuracy": round(6 / 7, 4)},
        "v2": {"name": "fmnist", "labelled": 3, "correct": 1, "accuracy": round(1 / 3, 4)}}
    assert feedback.accuracy_by_version([]) == {}


def test_a_correction_moves_a_request_from_right_to_wrong() -> None:
    right = rec("x", 7, 1, predicted=7, version="v1")
    assert feedback.accuracy_by_version([right])["v1"]["correct"] == 1
    corrected = rec("x", 9, 2, source="feedback")
    assert feedback.accuracy_by_version([right, corrected])["v1"]["correct"] == 0


def test_training_images_decode_like_serving_and_leave_out_what_does_not(cfg) -> None:  # noqa: F811
    sneaker = (ROOT / "Images" / "sneaker7.png").read_bytes()
    records = [rec("s", 7, 1, image=sneaker), rec("bad", 3, 2, image=b"not an image"),
               rec("t", 1, 3, image=png(200))]
    images, labels = feedback.training_images(records, cfg.imaging)
    assert images.dtype == np.uint8 and images.shape == (2, 28, 28)
    assert labels.tolist() == [7, 1]
    assert images[1].max() == 200 and images[0].max() > 100
    empty, none = feedback.training_images([], cfg.imaging)
    assert empty.shape == (0, 28, 28) and none.shape == (0,)


def test_the_checksum_names_the_labelled_set_not_the_order_it_was_read_in() -> None:
    a, b = rec("a", 1, 1, image=b"one"), rec("b", 2, 2, image=b"two")
    assert feedback.checksum([a, b]) == feedback.checksum([b, a])
    assert feedback.checksum([a, b]) != feedback.checksum([a, dataclasses.replace(b, label=3)])
    assert feedback.checksum([a, b]) != feedback.checksum([a, dataclasses.replace(b, image=b"2")])


def test_read_gives_one_record_per_request_and_leaves_them_on_the_topic(cfg) -> None:  # noqa: F811
    broker = MemoryBroker()
    broker.producer().publish([feedback.message(TOPIC, r) for r in
                               (rec("a", 1, 1, 1, "v1"), rec("a", 1, 2, 1, "v1"),
                                rec("b", 2, 3, 0, "v1"))], 1)
    broker.topics[TOPIC].append(dataclasses.replace(
        feedback.message(TOPIC, rec("c", 1, 4)), headers={"schema": "other"}))
    first = feedback.read(broker, cfg, timeout_s=5)
    assert [(r.request_id, r.predicted) for r in first] == [("a", 1), ("b", 0)]
    assert feedback.read(broker, cfg, timeout_s=5) == first


# --- the sent cache ---

def cache_cfg(base: config.Config, folder: Path, keep: int) -> config.Config:
    return dataclasses.replace(base, feedback=dataclasses.replace(
        base.feedback, sent_dir=folder, sent_keep=keep))


def sent(rid: str, **fields: object) -> feedback.Sent:
    return feedback.Sent(rid, f"/x/{rid}.png", "image/png", 1, **fields)  # type: ignore[arg-type]


def test_a_sent_request_is_recalled_with_its_image_and_answer(cfg, tmp_path) -> None:  # noqa: F811
    c = cache_cfg(cfg, tmp_path / "sent", 10)
    entry = sent("abc", label=None, predicted=7, model_name="fmnist", model_version="v1")
    feedback.remember(c, [(entry, b"bytes")])
    assert feedback.recall(c, "abc") == (entry, b"bytes")


def test_only_the_newest_sent_keep_are_kept(cfg, tmp_path) -> None:  # noqa: F811
    folder = tmp_path / "sent"
    c = cache_cfg(cfg, folder, 3)
    for i in range(5):
        feedback.remember(c, [(sent(f"r{i}"), b"x")])
        for path in folder.glob(f"r{i}.*"):  # mtimes one second apart, oldest first
            os.utime(path, ns=(i * 10**9, i * 10**9))
    feedback.remember(c, [(sent("r5"), b"x")])
    assert sorted(p.name for p in folder.iterdir()) == \
        ["r3.bin", "r3.json", "r4.bin", "r4.json", "r5.bin", "r5.json"]
    assert feedback.prune(folder, 1) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["r5.bin", "r5.json"]


def test_sent_keep_zero_records_nothing(cfg, tmp_path) -> None:  # noqa: F811
    c = cache_cfg(cfg, tmp_path / "sent", 0)
    feedback.remember(c, [(sent("abc"), b"x")])
    assert not (tmp_path / "sent").exists()


def test_an_unknown_request_says_where_it_looked_and_what_it_can_label(cfg, tmp_path) -> None:  # noqa: F811
    c = cache_cfg(cfg, tmp_path / "sent", 10)
    feedback.remember(c, [(sent("known"), b"x")])
    with pytest.raises(MissingArtifactError) as info:
        feedback.recall(c, "nope")
    assert str(tmp_path / "sent") in info.value.message and "1 request(s)" in info.value.message
    assert "fmnist send" in (info.value.hint or "")


def test_ids_that_are_not_file_names_are_stored_under_their_hash(cfg, tmp_path) -> None:  # noqa: F811
    c = cache_cfg(cfg, tmp_path / "sent", 10)
    feedback.remember(c, [(sent("a/../b"), b"x")])
    assert feedback.recall(c, "a/../b")[0].request_id == "a/../b"
    assert all("/" not in p.name and ".." not in p.stem for p in (tmp_path / "sent").iterdir())


def test_a_cache_that_cannot_be_written_never_fails_the_send(cfg, tmp_path, caplog) -> None:  # noqa: F811
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    feedback.remember(cache_cfg(cfg, blocker / "sent", 10), [(sent("a"), b"x")])
    assert "could not record" in caplog.text


def test_send_labels_the_request_and_records_it_for_feedback(cfg, tmp_path) -> None:  # noqa: F811
    c = cache_cfg(cfg, tmp_path / "sent", 10)
    broker = MemoryBroker()
    outgoing = client.read_images(["sneaker7.png", "boot9.png"], feedback.parse_label("9"))
    client.send(broker, c, outgoing)
    published = broker.topics[c.broker.request_topic]
    assert [m.headers["label"] for m in published] == ["9", "9"]
    entry, image = feedback.recall(c, outgoing[1].request_id)
    assert entry.label == 9 and entry.file.endswith("boot9.png") and entry.predicted is None
    assert image == outgoing[1].payload


def test_feedback_publishes_the_recalled_image_with_what_the_model_said(cfg, tmp_path) -> None:  # noqa: F811
    c = cache_cfg(cfg, tmp_path / "sent", 10)
    feedback.remember(c, [(sent("r1", predicted=5, model_name="fmnist", model_version="v1"),
                           b"png")])
    broker = MemoryBroker()
    result = feedback.label_sent(broker, c, "r1", 7)
    assert result["correct"] is False and result["model"] == {"name": "fmnist", "version": "v1"}
    (out,) = broker.topics[c.feedback.topic]
    record = feedback.parse(received(out))
    assert record is not None
    assert (record.request_id, record.label, record.image, record.source, record.predicted,
            record.model_version) == ("r1", 7, b"png", "feedback", 5, "v1")


# --- the worker: a labelled request is answered and recorded, with the answer ---

def feedback_records(broker: MemoryBroker) -> list[Record]:
    return [r for m in broker.topics.get(TOPIC, []) if (r := feedback.parse(received(m)))]


def test_a_labelled_request_is_answered_and_its_record_goes_out_with_the_answer(cfg) -> None:  # noqa: F811
    worker, broker, consumer, producer = make_worker(cfg)
    results = []
    worker.observers.append(lambda messages, result: results.append(result))
    # BrightnessPredictor: label = brightness // 25, so 130 is predicted 5
    producer.publish([request(png(130), "right", label="5"), request(png(130), "wrong", label="2"),
                      request(png(130), "plain")], 1)
    while worker.serve_once(consumer, producer):
        pass
    answers = {a["request_id"]: a for a in map(json.loads, (m.value for m in broker.topics[RES]))}
    assert all(a["status"] == "ok" and a["label"] == 5 for a in answers.values())
    assert answers["right"]["feedback"] == {"label": 5, "correct": True, "recorded": True}
    assert answers["wrong"]["feedback"] == {"label": 2, "correct": False, "recorded": True}
    assert "feedback" not in answers["plain"]
    records = {r.request_id: r for r in feedback_records(broker)}
    assert set(records) == {"right", "wrong"}
    assert (records["wrong"].label, records["wrong"].predicted, records["wrong"].model_version,
            records["wrong"].worker_id, records["wrong"].source) == \
        (2, 5, "000000000000", "w1", "request")
    assert records["right"].image == png(130)
    assert [r.labelled for r in results] == [[("fake", "000000000000", True),
                                              ("fake", "000000000000", False)]]


@pytest.mark.parametrize("label", ["12", "sneaker", "", "x" * 300])
def test_an_invalid_label_never_fails_the_request(cfg, label: str, caplog) -> None:  # noqa: F811
    worker, broker, consumer, producer = make_worker(cfg)
    producer.publish([request(png(130), "r1", label=label)], 1)
    while worker.serve_once(consumer, producer):
        pass
    (answer,) = (json.loads(m.value) for m in broker.topics[RES])
    assert answer["status"] == "ok" and answer["label"] == 5
    assert answer["feedback"]["recorded"] is False and "0-9" in answer["feedback"]["error"]
    assert feedback_records(broker) == [] and not broker.topics.get(cfg.broker.dlq_topic)
    assert "not 0-9" in caplog.text


def test_a_request_that_fails_or_speaks_oip_records_no_label(cfg) -> None:  # noqa: F811
    worker, broker, consumer, producer = make_worker(cfg)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "UINT8",
                                   "data": [0] * 784}]}).encode()
    producer.publish([request(b"junk", "bad", label="3"),
                      request(body, "oip", label="3", content_type="application/json")], 1)
    while worker.serve_once(consumer, producer):
        pass
    assert feedback_records(broker) == []
    assert len(broker.topics[RES]) == 2


def test_metrics_count_labelled_answers_and_accuracy_per_version(cfg) -> None:  # noqa: F811
    worker, broker, consumer, producer = make_worker(cfg)
    metrics = Metrics("memory")
    worker.observers.append(metrics.observe)
    producer.publish([request(png(130), f"r{i}", label="5" if i < 3 else "1") for i in range(4)]
                     + [request(png(130), "plain")], 1)
    while worker.serve_once(consumer, producer):
        pass
    text = generate_latest(metrics.registry).decode()
    assert 'fmnist_feedback_total{name="fake",outcome="correct",version="000000000000"} 3.0' in text
    assert 'fmnist_feedback_total{name="fake",outcome="wrong",version="000000000000"} 1.0' in text
    assert 'fmnist_feedback_accuracy{name="fake",version="000000000000"} 0.75' in text
