"""The original ML_as_a_Service Kafka clients, as they ran: kafka-python 2.0.2, the producer
pinned to ``api_version=(0, 10, 1)`` (docs/brokers.md#legacy-clients).

Kafka 4 no longer accepts the requests such a pin makes (KIP-896), so against the shared Kafka 4
broker the producer publishes nothing and still exits 0; against a Kafka 3.9 broker of the
test's own (``KAFKA_VERSION=3.9.1 scripts/kafka.sh up`` on free ports, its jars fetched by Maven
on the first run) a real `fmnist serve` answers it, and the original consumer reads the answer.

kafka-python runs in subprocesses, each a short script like the originals: importing it under
this suite's warnings-as-errors fails (its vendored ``six`` warns), and a script's exit code is
what a user of the original saw.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from fmnist.brokers import connect
from fmnist.brokers.kafka import KafkaBroker
from fmnist.testing.processes import ROOT
from fmnist.testing.run import LABELS, WORKER_START_S, OwnKafka
from fmnist.testing.topics import Topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

LEGACY_KAFKA = "3.9.1"
# A first run fetches the 3.9 jars (about 50 MB) with Maven before the broker starts.
FETCH_AND_START_S = 600
IMAGE = "sneaker7.png"  # the original producer's default image

# What Client/kafkaReq_send.py does, minus OpenCV: a PNG's bytes, no key, no headers, one send,
# one flush, and no look at the send's outcome. argv: servers, topic, png file, pin ("" = none).
PRODUCER = """
import sys
from kafka import KafkaProducer
servers, topic, path, pin = sys.argv[1:]
pinned = {"api_version": tuple(int(p) for p in pin.split("."))} if pin else {}
producer = KafkaProducer(bootstrap_servers=[servers], **pinned)
producer.send(topic, open(path, "rb").read())
producer.flush()
"""

# What Client/kafkaRes_recv.py does (no group, from the earliest answer), stopping after the
# first answer or after the timeout instead of reading forever. argv: servers, topic, timeout s.
CONSUMER = """
import sys
from kafka import KafkaConsumer
servers, topic, timeout_s = sys.argv[1:]
consumer = KafkaConsumer(topic, bootstrap_servers=servers, auto_offset_reset="earliest",
                         consumer_timeout_ms=int(float(timeout_s) * 1000))
for message in consumer:
    print(message.value.decode())
    break
consumer.close()
"""

# A topic's end offset per partition, as JSON. argv: servers, topic.
END_OFFSETS = """
import json, sys
from kafka import KafkaConsumer, TopicPartition
servers, topic = sys.argv[1:]
consumer = KafkaConsumer(bootstrap_servers=servers)
partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
print(json.dumps({tp.partition: end for tp, end in consumer.end_offsets(partitions).items()}))
consumer.close()
"""


def legacy(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def end_offsets(servers: str, topic: str) -> dict[str, int]:
    done = legacy(END_OFFSETS, servers, topic)
    assert done.returncode == 0, done.stderr
    ends: dict[str, int] = json.loads(done.stdout)
    assert ends, f"no partitions of {topic} known"
    return ends


@pytest.fixture
def rgb_png(tmp_path: Path) -> Path:
    """The sample image as the original producer sent it: read by OpenCV as 3 channels, then
    encoded as PNG again."""
    path = tmp_path / "request.png"
    buffer = io.BytesIO()
    with Image.open(ROOT / "Images" / IMAGE) as image:
        image.convert("RGB").save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    with Image.open(path) as sent:
        assert sent.mode == "RGB"
    return path


@pytest.fixture
def kafka39(tmp_path: Path) -> Iterator[OwnKafka]:
    """A Kafka 3.9.1 broker of this test's own, on free ports; the shared one is not touched. A
    broker that does not start fails the test (CI must not lose it quietly)."""
    kafka = OwnKafka(tmp_path / "state")
    kafka.env["KAFKA_VERSION"] = LEGACY_KAFKA
    up = subprocess.run([str(ROOT / "scripts" / "kafka.sh"), "up"], env=kafka.env,
                        capture_output=True, text=True, timeout=FETCH_AND_START_S)
    if up.returncode != 0 or f"Kafka {LEGACY_KAFKA} up" not in up.stdout:
        pytest.fail(f"Kafka {LEGACY_KAFKA} did not start:\n{up.stdout}{up.stderr}")
    yield kafka
    kafka.down()


def test_pinned_producer_is_answered_on_kafka_3_9(kafka39: OwnKafka, rgb_png: Path,
                                                  start_worker) -> None:
    topics = Topics("kafka")
    servers = {"FMNIST_KAFKA__BOOTSTRAP_SERVERS": kafka39.address}
    broker = connect("kafka", topics.config(servers))
    broker.ensure_topics([topics.request, topics.response])
    broker.close()
    worker = start_worker(topics, **servers)
    # A new topic's partitions are in the broker's metadata a moment before they take writes,
    # and the original producer (no retries) loses a request sent in that moment. End offsets
    # come back only once every partition is there.
    assert sum(end_offsets(kafka39.address, topics.request).values()) == 0

    sent = legacy(PRODUCER, kafka39.address, topics.request, str(rgb_png), "0.10.1")
    assert sent.returncode == 0, sent.stderr
    ends = end_offsets(kafka39.address, topics.request)
    assert sum(ends.values()) == 1, f"not one request on {topics.request}: {ends} {sent.stderr}"
    wait_s = WORKER_START_S + 60
    read = legacy(CONSUMER, kafka39.address, topics.response, str(wait_s), timeout=wait_s + 30)
    assert read.returncode == 0, read.stderr
    assert read.stdout.strip(), f"no answer within {wait_s} s\n{worker.output()}"
    answer = json.loads(read.stdout)
    assert answer["class_name"] == LABELS[IMAGE]["class_name"], answer
    assert answer["label"] == LABELS[IMAGE]["label"]
    assert answer["request_id_derived"] is True  # no headers: the id comes from the bytes
    assert worker.stop() == 0


@pytest.mark.parametrize(("pin", "published"), [("0.10.1", 0), ("", 1)],
                         ids=["pinned-0.10.1", "unpinned"])
def test_kafka_4_drops_the_pinned_producer(kafka: KafkaBroker, rgb_png: Path, pin: str,
                                           published: int) -> None:
    """The shared Kafka 4 broker closes the connection on the pinned producer's Produce v2 and
    the producer exits 0 all the same; without the pin the same script publishes."""
    topic = Topics("kafka").request
    kafka.ensure_topics([topic])
    try:
        before = end_offsets(kafka.address, topic)  # also waits until the partitions take writes
        sent = legacy(PRODUCER, kafka.address, topic, str(rgb_png), pin)
        assert sent.returncode == 0, sent.stderr
        after = end_offsets(kafka.address, topic)
        assert sum(after.values()) == sum(before.values()) + published, (before, after,
                                                                         sent.stderr)
    finally:
        kafka.delete_topics([topic])
