"""Two `fmnist serve` processes in one Kafka consumer group share a multi-partition topic."""

from __future__ import annotations

import json
import re
import time

import pytest

from fmnist.brokers import OutMessage, connect
from fmnist.testing.processes import ROOT
from fmnist.testing.topics import Topics
from fmnist.testing.waiting import poll_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def assignment(log: str) -> set[str]:
    """The partitions a worker owns now, from its last `partitions assigned` log line."""
    lines = re.findall(r"partitions assigned: (.*)", log)
    if not lines or lines[-1].strip() == "none":
        return set()
    return {p.strip() for p in lines[-1].split(",")}


def test_two_workers_answer_500_requests_exactly_once(start_worker) -> None:
    topics = Topics("kafka")
    cfg = topics.config()
    broker = connect("kafka", cfg)
    broker.ensure_topics([topics.request, topics.response, topics.dlq])
    first = start_worker(topics)
    poll_until(lambda: len(assignment(first.output())) == cfg.kafka.partitions, 120,
               message="the first worker to own every partition")
    second = start_worker(topics)
    # Both own a share, together all of it, none twice: the group is stable.
    poll_until(lambda: (assignment(first.output()) and assignment(second.output())
                        and assignment(first.output()).isdisjoint(assignment(second.output()))
                        and len(assignment(first.output()) | assignment(second.output()))
                        == cfg.kafka.partitions), 120,
               message="the two workers to split the partitions")

    reader = broker.consumer(topics.response, group=None)
    images = sorted((ROOT / "Images").glob("*.png"))
    ids = [f"req-{i:03d}" for i in range(500)]
    broker.producer().publish(
        [OutMessage(topics.request, images[i % len(images)].read_bytes(), key=rid,
                    headers={"request_id": rid}) for i, rid in enumerate(ids)], timeout_s=30)
    answers: list[dict] = []
    deadline = time.monotonic() + 180
    while len(answers) < len(ids) and time.monotonic() < deadline:
        answers.extend(json.loads(m.value) for m in reader.next_batch(500, timeout_s=1))
    # A little longer, so a duplicate that would arrive late is caught too.
    end = time.monotonic() + 2
    while time.monotonic() < end:
        answers.extend(json.loads(m.value) for m in reader.next_batch(500, timeout_s=0.5))
    reader.close()
    broker.close()

    answered = [a["request_id"] for a in answers]
    assert sorted(answered) == ids, f"{len(set(ids) - set(answered))} lost, " \
                                    f"{len(answered) - len(set(answered))} duplicated"
    assert all(a["status"] == "ok" for a in answers)
    workers = {a["worker_id"] for a in answers}
    assert len(workers) == 2, workers
    assert first.stop() == 0 and second.stop() == 0
