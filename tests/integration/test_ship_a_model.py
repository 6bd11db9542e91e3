"""README's "Ship a new model" walkthrough, run as written: each command of the block after
``<!-- ship-a-model -->`` (the ``&`` line as a worker process), on private topics and a
private model store."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import uuid
from pathlib import Path

import pytest

from fmnist.testing.processes import FMNIST, ROOT, WorkerProcess
from fmnist.testing.topics import Topics

pytestmark = [pytest.mark.slow, pytest.mark.kafka]


def walkthrough() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- ship-a-model -->", 1)[1].split("```bash\n", 1)[1].split("```")[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_ship_a_new_model_walkthrough_runs_as_written(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:10]
    topics = Topics("kafka")
    env = topics.env({"FMNIST_REGISTRY__TOPIC": f"models-{tag}",
                      "FMNIST_REGISTRY__BLOB_TOPIC": f"models-{tag}.blobs",
                      "FMNIST_REGISTRY__EVENTS_TOPIC": f"modelevents-{tag}",
                      "FMNIST_FEEDBACK__TOPIC": f"feedback-{tag}",
                      "FMNIST_FEEDBACK__SENT_DIR": str(tmp_path / "sent"),
                      # the worker's own weights directory starts empty: it fetches from the store
                      "FMNIST_MODEL__WEIGHTS_DIR": str(tmp_path / "weights")})
    full = json.loads((ROOT / "weights" / "fmnist-full.meta.json").read_text())["version"]
    first = json.loads((ROOT / "weights" / "fmnist.meta.json").read_text())["version"]
    worker = None
    outputs: list[str] = []
    try:
        for line in walkthrough():
            args = shlex.split(line.rstrip("&"))
            assert args[0] == "fmnist", line
            if line.endswith("&"):
                worker = WorkerProcess(topics, tmp_path / "worker.log", *args[2:], env=env)
                continue
            done = subprocess.run([*FMNIST, *args[1:]], env=env, cwd=ROOT, capture_output=True,
                                  text=True, timeout=180)
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}\n" + (
                worker.output()[-3000:] if worker else "")
            outputs.append(done.stdout + done.stderr)
        assert worker is not None and worker.alive(), "the walkthrough starts a worker"
    finally:
        if worker is not None:
            worker.stop()
    text = "\n".join(outputs)
    assert f"published fmnist@{first}" in text and f"promoted fmnist@{first}" in text
    assert f"promoted fmnist@{full}" in text and "serving it" in text
    answered = next(o for o in outputs if "sneaker7.png" in o)
    assert f"fmnist@{full}" in answered  # the answer names the version promoted
    assert re.search(rf"rolled back to fmnist@{first}", text)
    shown = next(o for o in outputs if "feedback accuracy" in o)
    assert re.search(rf"fmnist@{full}.*100\.00% of 1", shown), shown  # the labelled request
    log = worker.output()
    assert f"now serving fmnist@{full}" in log and f"now serving fmnist@{first}" in log, log
