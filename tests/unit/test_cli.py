"""The CLI surface: every command exists, has help, is documented, and maps errors to codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fmnist.cli import app

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ["config", "data", "train", "evaluate", "predict", "serve", "send", "listen", "dlq",
            "status"]
runner = CliRunner()


def registered() -> set[str]:
    return {c.name for c in app.registered_commands}


def test_every_expected_command_is_registered() -> None:
    assert set(COMMANDS) <= registered()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_every_command_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for command in registered():
        assert f"fmnist {command}" in readme, f"`fmnist {command}` is not in README.md"


def test_every_fmnist_command_in_the_readme_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    mentioned = set(re.findall(r"\bfmnist ([a-z]+)\b", readme))
    assert mentioned <= registered() | {"help"}, mentioned - registered()


def test_help_imports_no_heavy_library() -> None:
    """`fmnist --help` must not pay for TensorFlow or broker clients."""
    code = ("import sys; from typer.testing import CliRunner; from fmnist.cli import app; "
            "CliRunner().invoke(app, ['--help']); "
            "print(sorted(m for m in ('tensorflow', 'jax', 'keras', 'kafka', 'google.cloud.pubsub') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_python_dash_m_runs_the_same_app() -> None:
    out = subprocess.run([sys.executable, "-m", "fmnist", "--help"], capture_output=True,
                         text=True, check=True)
    assert "serve" in out.stdout and "predict" in out.stdout


def test_bad_environment_variable_is_exit_2_naming_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("FMNIST_SERVE__MAX_BATCH_SIZE", "lots")
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 2
    assert "FMNIST_SERVE__MAX_BATCH_SIZE" in result.output
    assert "Traceback" not in result.output


def test_unknown_key_in_config_file_is_exit_2_naming_the_file(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve:\n  max_batch: 3\n")
    result = runner.invoke(app, ["config", "--config", str(bad)])
    assert result.exit_code == 2
    assert str(bad) in result.output and "max_batch" in result.output


def test_config_json_masks_secrets(monkeypatch) -> None:
    monkeypatch.setenv("FMNIST_KAFKA__SASL_PASSWORD", "hunter2")
    result = runner.invoke(app, ["config", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["kafka"]["sasl_password"] == "***"
    assert "hunter2" not in result.output


def test_predict_with_missing_weights_is_exit_3_with_a_hint(tmp_path) -> None:
    from PIL import Image

    image = tmp_path / "blank.png"
    Image.new("L", (28, 28)).save(image)
    result = runner.invoke(app, ["predict", str(image), "--name", "no-such-model"])
    assert result.exit_code == 3
    assert "no-such-model.keras" in result.output
    assert "fmnist train" in result.output


def test_send_missing_file_fails_before_contacting_any_broker(monkeypatch) -> None:
    # An unreachable broker address: if send tried to connect, it would fail with code 4.
    monkeypatch.setenv("FMNIST_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1")
    result = runner.invoke(app, ["send", "does-not-exist.png", "--broker", "kafka"])
    assert result.exit_code == 3
    assert "does-not-exist.png" in result.output


def test_unknown_broker_is_a_usage_error() -> None:
    result = runner.invoke(app, ["send", "sneaker7.png", "--broker", "rabbitmq"])
    assert result.exit_code == 2
    assert "kafka" in result.output and "pubsub" in result.output
