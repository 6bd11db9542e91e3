"""The client install (requirements/client.txt, no Keras, JAX or TensorFlow) in a virtualenv of
its own: it sends to a worker and gets the answer, and a command that needs the model says
which install it needs instead of failing with a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist.testing.processes import ROOT, WorkerProcess
from fmnist.testing.topics import Topics

pytestmark = [pytest.mark.slow, pytest.mark.kafka]


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("client") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    for args in (["-c", "constraints.txt", "-r", "requirements/client.txt"], ["--no-deps", "-e", "."]):
        done = subprocess.run([*pip, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    return venv


def test_client_install_sends_and_is_answered_without_any_model_package(client_venv: Path,
                                                                       tmp_path: Path) -> None:
    python = str(client_venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import importlib.util as u; print(*(u.find_spec(m) "
                            "is not None for m in ('tensorflow', 'keras', 'jax', 'fmnist')))"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["False", "False", "False", "True"]
    topics = Topics("kafka")
    worker = WorkerProcess(topics, tmp_path / "worker.log", "--broker", "kafka")
    try:
        fmnist = [str(client_venv / "bin" / "fmnist")]
        done = subprocess.run([*fmnist, "send", "sandal5.png", "--broker", "kafka", "--wait",
                               "--timeout", "90", "--json"], env=topics.env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=150)
        assert done.returncode == 0, done.stdout + done.stderr + worker.output()[-2000:]
        [answer] = json.loads(done.stdout)
        assert answer["class_name"] == "Sandal" and answer["label"] == 5
        refused = subprocess.run([*fmnist, "predict", "Images/sandal5.png"], env=topics.env(), cwd=ROOT,
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2
        assert "`fmnist predict` needs keras" in refused.stderr
        assert "docs/install.md" in refused.stderr and "Traceback" not in refused.stderr
    finally:
        worker.stop()
