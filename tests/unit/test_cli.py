"""The CLI surface: every command exists, has help, is documented, and maps errors to codes."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import shellingham
import typer.core
import typer.main
from typer.testing import CliRunner

import fmnist
from fmnist.cli import app

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ["config", "data", "train", "evaluate", "predict", "serve", "send", "feedback",
            "listen", "dlq", "status"]
runner = CliRunner()


def registered() -> set[str]:
    return ({c.name for c in app.registered_commands} |
            {g.name for g in app.registered_groups if g.name})


def test_every_expected_command_is_registered() -> None:
    assert set(COMMANDS) <= registered()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def command_object(command: str) -> Any:
    """The Click command Typer builds for `fmnist COMMAND`."""
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    return group.commands[command]


def examples(command: str) -> list[str]:
    """The invocations listed under "Examples:" in the command's docstring."""
    help_text = command_object(command).help or ""
    _, _, block = help_text.partition("Examples:")
    return [line.strip() for line in block.splitlines() if line.strip()]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_shows_examples_one_per_line(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    lines = {line.strip() for line in result.output.splitlines()}
    assert examples(command) and set(examples(command)) <= lines, result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_example_is_a_valid_invocation(command: str) -> None:
    """Each example names this command and its options parse (nothing runs)."""
    for example in examples(command):
        argv = shlex.split(example)
        while "=" in argv[0]:  # leading VAR=value environment assignments
            argv.pop(0)
        assert argv[:2] == ["fmnist", command], example
        with command_object(command).make_context(command, argv[2:]):
            pass


def test_version_prints_the_installed_metadata_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == importlib.metadata.version("fmnist") + "\n"


def test_version_without_installed_metadata_is_a_pep440_placeholder(monkeypatch) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    assert fmnist.__version__  # cache the real value so monkeypatch restores it afterwards
    monkeypatch.delattr(fmnist, "__version__")
    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert fmnist.__version__ == "0+unknown"


def test_show_completion_prints_a_bash_script_for_fmnist(monkeypatch) -> None:
    # Typer asks shellingham which shell runs us; pin the answer so no parent process matters.
    monkeypatch.setattr(shellingham, "detect_shell", lambda *a, **k: ("bash", "/bin/bash"))
    result = runner.invoke(app, ["--show-completion"], env={"SHELL": "/bin/bash"})
    assert result.exit_code == 0, result.output
    assert "_FMNIST_COMPLETE=complete_bash" in result.output
    assert re.search(r"^complete .* fmnist$", result.output, re.MULTILINE), result.output


@pytest.mark.parametrize(("words", "expected"), [("fmnist pre", "predict"),
                                                  ("fmnist serve --bro", "--broker")])
def test_completion_completes_commands_and_options(words: str, expected: str) -> None:
    """What the installed script asks fmnist when the user presses Tab."""
    env = {"_FMNIST_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split()) - 1)}
    result = runner.invoke(app, [], env=env, prog_name="fmnist")
    assert result.exit_code == 0, result.output
    assert result.output.split() == [expected]


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


def test_send_refuses_a_label_that_is_not_one_before_contacting_any_broker(monkeypatch) -> None:
    monkeypatch.setenv("FMNIST_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1")
    result = runner.invoke(app, ["send", "sneaker7.png", "--broker", "kafka", "--label", "11"])
    assert result.exit_code == 2
    assert "'11' is not a label" in result.output and "7 Sneaker" in result.output


def test_feedback_for_an_unknown_request_is_exit_3_before_contacting_any_broker(
        monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("FMNIST_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1")
    monkeypatch.setenv("FMNIST_FEEDBACK__SENT_DIR", str(tmp_path / "sent"))
    result = runner.invoke(app, ["feedback", "abc123", "sneaker", "--broker", "kafka"])
    assert result.exit_code == 3
    assert str(tmp_path / "sent") in result.output and "fmnist send" in result.output
