"""The serving image as users run it: built from the Dockerfile by scripts/images, a worker
container on the host's Kafka, locked down as deploy/k8s runs it (read-only root filesystem,
no capabilities, user 10001), answering the sample images and draining on SIGTERM."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from fmnist.testing import containers
from fmnist.testing.processes import FMNIST, ROOT
from fmnist.testing.topics import Topics

pytestmark = [pytest.mark.slow, pytest.mark.container]

MAX_SERVE_IMAGE_BYTES = 1.2e9   # issue 17's budget for the image without TensorFlow


@pytest.fixture(scope="module")
def serve_image() -> str:
    if (why := containers.can_build()) is not None:
        pytest.skip(why)
    return containers.build("serve")


def test_serve_image_leaves_tensorflow_out_and_runs_as_a_user(serve_image: str) -> None:
    image = containers.inspect_image(serve_image)
    size = image["Size"]
    print(f"{serve_image}: {size / 1e6:.0f} MB")
    assert size <= MAX_SERVE_IMAGE_BYTES
    config = image["Config"]
    assert config["User"] == "fmnist" and config["StopSignal"] == "SIGTERM"
    assert "/healthz" in " ".join(image["Healthcheck"]["Test"])
    probe = containers.podman(
        "run", "--rm", "--read-only", "--entrypoint", "python3", serve_image, "-c",
        "import importlib.util as u, os; print(os.getuid(), *(u.find_spec(m) is not None "
        "for m in ('tensorflow', 'matplotlib', 'jax', 'keras')))")
    assert probe.stdout.split() == ["10001", "False", "False", "True", "True"]


@pytest.mark.kafka
def test_worker_container_classifies_the_samples_and_drains_on_sigterm(serve_image: str,
                                                                       tmp_path: Path) -> None:
    topics = Topics("kafka")
    tag = uuid.uuid4().hex[:10]
    private = {  # the worker's own model store and announcements, so no other run's promote
        "FMNIST_REGISTRY__TOPIC": f"models-{tag}",                 # reaches it
        "FMNIST_REGISTRY__BLOB_TOPIC": f"models-{tag}.blobs",
        "FMNIST_REGISTRY__EVENTS_TOPIC": f"modelevents-{tag}",
        "FMNIST_FEEDBACK__TOPIC": f"feedback-{tag}",
        "FMNIST_SERVE__METRICS_PORT": str(19000 + int(tag[:4], 16) % 1000),
    }
    settings = {k: v for k, v in topics.env(private).items() if k.startswith("FMNIST_")}
    worker = containers.Container(serve_image, f"fmnist-test-{tag}", settings,
                                  ["serve", "--broker", "kafka", "--quiet", "--log-format", "json"])
    try:
        deadline = time.monotonic() + 120
        while not worker.healthy():
            assert worker.state()["Running"], worker.logs()[-3000:]
            assert time.monotonic() < deadline, "not healthy in 120 s\n" + worker.logs()[-3000:]
            time.sleep(1)
        labels = json.loads((ROOT / "Images" / "labels.json").read_text())
        done = subprocess.run([*FMNIST, "send", *sorted(labels), "--broker", "kafka", "--wait",
                               "--timeout", "60", "--json"], env=topics.env(private), cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr + worker.logs()[-3000:]
        got = {Path(a["file"]).name: a["label"] for a in json.loads(done.stdout)}
        assert got == {name: sample["label"] for name, sample in labels.items()}
        assert worker.stop() == 0, worker.logs()[-3000:]
        log = worker.logs()
        assert "SIGTERM received" in log and "stopped after 10 requests (0 errors)" in log
    finally:
        worker.remove()
