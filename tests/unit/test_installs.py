"""The smaller install sets (requirements/*.txt) stay true to pyproject.toml, and a command that
needs what an install leaves out says so clearly."""

from __future__ import annotations

import tomllib

import pytest
import typer

from fmnist import installs
from fmnist.config import project_root

ROOT = project_root()


def requirement_lines(name: str) -> list[str]:
    lines = (ROOT / "requirements" / f"{name}.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_every_install_set_line_is_one_of_the_whole_tools_dependencies() -> None:
    dependencies = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    for name in ("client", "serve"):
        for line in requirement_lines(name):
            assert line.startswith("-r ") or line in dependencies, (name, line)


def test_the_client_set_has_no_model_packages_and_the_serve_set_no_training_ones() -> None:
    client = requirement_lines("client")
    serve = requirement_lines("serve")
    assert "-r client.txt" in serve
    heavy = ("tensorflow", "keras", "jax", "matplotlib")
    assert not [line for line in client if line.startswith(heavy)]
    assert not [line for line in serve if line.startswith(("tensorflow", "matplotlib"))]
    assert {line.split(">")[0] for line in serve} >= {"keras", "jax[cpu]", "prometheus-client"}


def test_require_names_every_missing_package_and_the_whole_install() -> None:
    installs.require("Nothing", "json")  # present: no error
    with pytest.raises(installs.MissingPackage) as caught:
        installs.require("Training", "json", "no_such_module_a", "no_such_module_b")
    assert caught.value.exit_code == 2
    assert "Training needs no_such_module_a and no_such_module_b" in caught.value.message
    assert "pip install -c constraints.txt -e ." in (caught.value.hint or "")


def test_an_import_error_for_a_left_out_package_becomes_the_clear_error() -> None:
    clear = installs.from_import_error("`fmnist predict`", ModuleNotFoundError(name="keras.src"))
    assert clear is not None and "`fmnist predict` needs keras" in clear.message
    # any other missing module is a bug and keeps its traceback
    assert installs.from_import_error("x", ModuleNotFoundError(name="fmnist.nope")) is None


def test_the_cli_turns_a_left_out_package_into_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from fmnist.cli import handle_errors

    @handle_errors
    def predict_cmd() -> None:
        raise ModuleNotFoundError("No module named 'jax'", name="jax")

    with pytest.raises(typer.Exit) as caught:
        predict_cmd()
    assert caught.value.exit_code == 2
    assert "`fmnist predict` needs jax[cpu]" in capsys.readouterr().err
