"""`benchmarks/bench.py --smoke` against the real brokers, so the benchmark cannot rot.

Checks the shape of the JSON and that every figure is a sane positive number, never the
figures themselves (they depend on the machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist.testing.processes import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """FMNIST_* variables naming weights to serve: the project's, else a 1-epoch throwaway."""
    if (ROOT / "weights" / "fmnist.keras").is_file():
        return {}
    weights_dir = tmp_path_factory.mktemp("bench-weights")
    env = {**os.environ, "FMNIST_MODEL__WEIGHTS_DIR": str(weights_dir)}
    done = subprocess.run([sys.executable, "-m", "fmnist", "train", "--limit", "2000", "--epochs",
                           "1", "--name", "smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"FMNIST_MODEL__WEIGHTS_DIR": str(weights_dir), "FMNIST_MODEL__NAME": "smoke"}


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.parametrize("broker", [pytest.param("kafka", marks=pytest.mark.kafka),
                                    pytest.param("pubsub", marks=pytest.mark.pubsub)])
def test_bench_smoke_writes_sane_results(broker: str, bench_model: dict[str, str],
                                         tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "benchmarks/bench.py", "--smoke", "--brokers", broker,
                           "--out", str(tmp_path)], cwd=ROOT, env={**os.environ, **bench_model},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert {"meta", "model", "configs", "targets"} <= result.keys()
    assert (tmp_path / "smoke.md").read_text().count("|") > 10
    assert (tmp_path / "smoke.png").read_bytes().startswith(b"\x89PNG")
    assert result["meta"]["smoke"] is True and result["meta"]["machine"]["nproc"] >= 1

    (model,) = result["model"].values()
    assert all(positive(v) for v in model["images_per_s"].values()), model
    assert 0 < model["single_image"]["p50_ms"] <= model["single_image"]["p99_ms"]
    assert all(positive(v) for v in model["per_request_us"].values())

    assert set(result["configs"]) == {f"{broker}/echo/1w", f"{broker}/fmnist/1w"}
    for name, c in result["configs"].items():
        assert c is not None, f"{name} failed: see the bench output"
        sat = c["saturation"]
        assert sat["answered"] == sat["ok"] == sat["requests"] > 0, (name, sat)
        assert positive(sat["answered_per_s"]) and positive(sat["published_per_s"])
        (paced,) = c["rates"]
        assert paced["answered"] == paced["ok"] == paced["requests"] > 0, (name, paced)
        assert 0 < paced["p50_ms"] <= paced["p95_ms"] <= paced["p99_ms"] < 60_000, (name, paced)
        assert positive(paced["achieved_per_s"]) and isinstance(paced["sustained"], bool)
        assert 0 < c["cold_start_s"] < 120 and positive(c["rss_peak_mb"])
        assert c["child_processes"] == 0 and c["exit_codes"] == [0], (name, c)
    assert result["configs"][f"{broker}/fmnist/1w"]["model_loads_per_process"] == 1

    names = {t["target"] for t in result["targets"]}
    assert f"{broker} e2e saturation throughput / echo ceiling" in names
    assert "worker cold start (process start -> first answer)" in names
    assert all(isinstance(t["pass"], bool) for t in result["targets"])
    assert "PASS" in done.stdout or "FAIL" in done.stdout
