"""scripts/demo's parts that decide, run fast: which brokers it demonstrates (Kafka alone, with
one line on how to add Pub/Sub, when the emulator is not installed), and its bounded wait for
a worker's readiness, which names the worker and shows its log when it never gets ready."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from fmnist.testing.processes import ROOT
from fmnist.testing.run import free_port

DEMO = ROOT / "scripts" / "demo"
# A process standing in for a worker that runs (killed by the test's own command line).
LIVE = "sleep 30 >/dev/null 2>&1 & pid=$!; rc=0;"


def demo(call: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``call`` in a bash that sourced scripts/demo (which runs nothing when sourced), with a
    state dir of its own so that no emulator this machine runs counts."""
    full = {**os.environ, "FMNIST_STATE": str(tmp_path / "state"),
            "PUBSUB_HOST_PORT": f"127.0.0.1:{free_port()}", **env}
    return subprocess.run([shutil.which("bash") or "/bin/bash", "-c", f"source {DEMO}; {call}"],
                          env=full, capture_output=True, text=True, timeout=60)


def test_without_the_emulator_the_demo_runs_kafka_and_says_how_to_add_pubsub(
        tmp_path: Path) -> None:
    done = demo("demo_brokers", tmp_path, PUBSUB_SDK_DIRS=str(tmp_path / "no-google-cloud-sdk"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["kafka"]
    (line,) = done.stderr.splitlines()
    assert line.startswith("Pub/Sub skipped: its emulator is not installed")
    assert "google-cloud-cli" in line and "pubsub-emulator" in line


def test_with_the_emulator_installed_the_demo_runs_both(tmp_path: Path) -> None:
    """This machine has it (the test suite needs it: CI fails without it)."""
    done = demo("demo_brokers", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["kafka", "pubsub"] and done.stderr == ""


def test_a_worker_that_never_gets_ready_is_reported_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    log.write_text("line 1\nthe last thing the worker said\n")
    port = free_port()  # nothing answers there
    done = demo(f"{LIVE} wait_ready kafka {port} $pid {log} 1 || rc=$?; kill $pid; exit $rc",
                tmp_path)
    assert done.returncode == 1
    assert f"the kafka worker was not ready within 1s (http://127.0.0.1:{port}/readyz)" in \
        done.stderr
    assert "the last thing the worker said" in done.stderr


def test_a_worker_that_exits_during_start_is_reported_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    log.write_text("ModelError: weights/fmnist.keras is missing\n")
    done = demo(f"true & pid=$!; wait $pid; wait_ready pubsub {free_port()} $pid {log} 30",
                tmp_path)
    assert done.returncode == 1
    assert "the pubsub worker exited before it was ready" in done.stderr
    assert "weights/fmnist.keras is missing" in done.stderr


def test_the_wait_ends_as_soon_as_readyz_answers(tmp_path: Path) -> None:
    import http.server
    import threading

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(200 if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = demo(f"{LIVE} wait_ready kafka {server.server_address[1]} $pid "
                    f"{tmp_path / 'none.log'} 20 || rc=$?; kill $pid; exit $rc", tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr
