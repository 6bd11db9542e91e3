"""`fmnist serve` in a subprocess, driven by `fmnist send` / `listen` and raw producers."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from fmnist.brokers import OutMessage, connect
from fmnist.testing.processes import FMNIST, ROOT
from fmnist.testing.topics import Topics

pytestmark = pytest.mark.slow
LABELS = json.loads((ROOT / "Images" / "labels.json").read_text())


def run_cli(topics: Topics, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*FMNIST, *args], cwd=ROOT, env=topics.env(), capture_output=True,
                          text=True, timeout=timeout)


def test_send_wait_classifies_every_sample_image(topics: Topics, start_worker) -> None:
    worker = start_worker(topics)
    images = sorted(LABELS)
    result = run_cli(topics, "send", "--wait", "--json", "--timeout", "120", *images)
    assert result.returncode == 0, result.stderr + worker.output()
    answers = json.loads(result.stdout)
    assert [a["file"].rsplit("/", 1)[-1] for a in answers] == images
    assert len({a["request_id"] for a in answers}) == len(images)
    for answer in answers:
        name = answer["file"].rsplit("/", 1)[-1]
        assert answer["status"] == "ok"
        assert answer["label"] == LABELS[name]["label"], (name, answer)
        assert answer["request_id_derived"] is False
        assert answer["model"]["version"]
    assert worker.stop() == 0  # SIGTERM: drain, commit, exit 0


def test_raw_request_without_headers_is_answered(topics: Topics, start_worker, broker_name) -> None:
    start_worker(topics)
    cfg = topics.config()
    broker = connect(broker_name, cfg)
    broker.ensure_topics([topics.request, topics.response])
    reader = broker.consumer(topics.response, group=None)
    payload = (ROOT / "Images" / "boot9.png").read_bytes()
    broker.producer().publish([OutMessage(topics.request, payload)], timeout_s=10)
    deadline, got = time.monotonic() + 120, []
    while not got and time.monotonic() < deadline:
        got = reader.next_batch(1, timeout_s=1)
    reader.close()
    broker.close()
    assert got, "no answer to a raw request within 120 s"
    answer = json.loads(got[0].value)
    assert answer["request_id_derived"] is True
    assert answer["class_name"] == "Ankle boot"
    assert got[0].headers["request_id"] == answer["request_id"]


def test_listen_prints_answers_as_json_lines(topics: Topics, start_worker) -> None:
    start_worker(topics)
    listener = subprocess.Popen([*FMNIST, "listen", "--json", "--count", "2", "--timeout", "150"],
                                cwd=ROOT, env=topics.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    ready = listener.stderr.readline()  # printed once its reader is open
    assert "Listening on" in ready, ready
    sent = run_cli(topics, "send", "--wait", "--json", "--timeout", "120", "top0.png",
                   "trouser1.png")
    assert sent.returncode == 0, sent.stderr
    ids = {a["request_id"] for a in json.loads(sent.stdout)}
    out, err = listener.communicate(timeout=160)
    assert listener.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert {line["request_id"] for line in lines} == ids
    assert {line["class_name"] for line in lines} == {"T-shirt/top", "Trouser"}

