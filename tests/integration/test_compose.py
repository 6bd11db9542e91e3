"""docker-compose.yml's workers and Prometheus, run as written by podman-compose: two workers of
the serving image on a Kafka of the test's own (on this machine's address, which containers
reach), the sample images answered through them, Prometheus finding both by the service name
and counting what they answered, and every worker draining to exit 0 on `stop`.

The file's `kafka` and `pubsub` services use images this machine cannot pull, so they are not
run here (the file says so); Prometheus is Debian's build (deploy/compose/prometheus.Dockerfile).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fmnist.testing import containers
from fmnist.testing.processes import FMNIST, ROOT
from fmnist.testing.run import OwnKafka, free_port
from fmnist.testing.waiting import http_get

pytestmark = [pytest.mark.slow, pytest.mark.container]

WORKERS = 2
COMPOSE = [sys.executable, "-m", "podman_compose"]
# Run inside a worker's container: exit 0 once its /readyz says 200
READY = ("import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/readyz', "
         "timeout=2)")


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    if (why := containers.can_build()) is not None:
        pytest.skip(why)
    return {target: containers.build(target) for target in ("serve", "prometheus")}


@pytest.fixture
def own_kafka(tmp_path: Path) -> Iterator[OwnKafka]:
    kafka = OwnKafka(tmp_path / "state", host=containers.host_address())
    kafka.up()
    try:
        yield kafka
    finally:
        kafka.down()


def prometheus_query(port: int, query: str) -> list[dict[str, Any]]:
    status, body = http_get(f"http://127.0.0.1:{port}/api/v1/query?"
                            + urllib.parse.urlencode({"query": query}))
    return json.loads(body)["data"]["result"] if status == 200 else []  # type: ignore[no-any-return]


def test_compose_workers_answer_and_prometheus_scrapes_them(images: dict[str, str],
                                                            own_kafka: OwnKafka) -> None:
    project = f"fmnist-test-{uuid.uuid4().hex[:8]}"
    prometheus_port = free_port()
    env = {**containers.env(), "FMNIST_COMPOSE_KAFKA": own_kafka.address,
           "FMNIST_WORKERS": str(WORKERS), "PROMETHEUS_IMAGE": images["prometheus"],
           "PROMETHEUS_PORT": str(prometheus_port)}
    compose = [*COMPOSE, "-p", project, "-f", str(ROOT / "docker-compose.yml")]

    def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*compose, *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
        return done

    names = [f"{project}_worker_{i}" for i in range(1, WORKERS + 1)]
    try:
        run("up", "-d", "--no-deps", "worker", "prometheus")
        deadline = time.monotonic() + 180
        for name in names:
            # ready, not only alive: each has joined the group, so no rebalance moves requests
            # (and answers some twice, as at-least-once allows) while the client sends
            while containers.podman("exec", name, "python3", "-c", READY, check=False
                                    ).returncode != 0:
                assert time.monotonic() < deadline, containers.podman("logs", name).stderr[-3000:]
                time.sleep(1)

        labels = json.loads((ROOT / "Images" / "labels.json").read_text())
        client = {k: v for k, v in os.environ.items() if not k.startswith("FMNIST_")}
        client["FMNIST_KAFKA__BOOTSTRAP_SERVERS"] = own_kafka.address
        done = subprocess.run([*FMNIST, "send", *sorted(labels) * 2, "--broker", "kafka", "--wait",
                               "--timeout", "90", "--json"], env=client, cwd=ROOT,
                              capture_output=True, text=True, timeout=150)
        assert done.returncode == 0, done.stdout + done.stderr
        answers = json.loads(done.stdout)
        assert len(answers) == 2 * len(labels)
        assert all(a["label"] == labels[Path(a["file"]).name]["label"] for a in answers)

        # Prometheus finds both workers through the service name and sees every answer
        deadline = time.monotonic() + 90
        while True:
            up = prometheus_query(prometheus_port, 'up{job="fmnist-worker"}')
            answered = prometheus_query(prometheus_port, 'sum(fmnist_requests_total{outcome="ok"})')
            if (len(up) == WORKERS and all(r["value"][1] == "1" for r in up) and answered
                    and float(answered[0]["value"][1]) >= len(answers)):
                break
            assert time.monotonic() < deadline, f"Prometheus saw up={up} answered={answered}"
            time.sleep(2)

        run("stop", "-t", "45", "worker", timeout=120)
        for name in names:
            state = json.loads(containers.podman("inspect", name).stdout)[0]["State"]
            assert state["ExitCode"] == 0, containers.podman("logs", name).stderr[-3000:]
    finally:
        subprocess.run([*compose, "down", "-v", "-t", "5"], cwd=ROOT, env=env,
                       capture_output=True, timeout=180)
