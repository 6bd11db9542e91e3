"""The `fmnist` command: thin Typer commands over the library.

Each command builds the config (one loader for all), calls one library function and renders the
result. This is the one place that turns an ``FmnistError`` into a printed hint and an exit code.
Heavy imports (TensorFlow, broker clients) happen inside commands, so `--help` is instant.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from fmnist import config as config_module
from fmnist.errors import FmnistError, Interrupted

app = typer.Typer(
    name="fmnist",
    help="Fashion-MNIST classifier served behind Kafka or Google Cloud Pub/Sub.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML file layered over configs/default.yaml.",
                 show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


def handle_errors(func: F) -> F:
    """Map library errors to one clean message and the exit code STYLE.md assigns."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from fmnist import console

        try:
            return func(*args, **kwargs)
        except FmnistError as exc:
            console.error(exc.message, exc.hint)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.error("Interrupted.")
            raise typer.Exit(Interrupted.exit_code) from None

    return wrapper  # type: ignore[return-value]


def load_config(config_file: Path | None, **flags: Any) -> config_module.Config:
    """Flags are passed as section__key=value; None means the flag was not given."""
    return config_module.load(config_file, {k.replace("__", "."): v for k, v in flags.items()})


@app.command("config")
@handle_errors
def config_cmd(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Print the effective config (defaults < default.yaml < --config < env < flags)."""
    from fmnist import console

    data = config_module.as_dict(load_config(config))
    if as_json:
        console.print_json(data)
        return
    import yaml

    console.out.print(yaml.safe_dump(data, sort_keys=False), highlight=False, end="")


@app.command("data")
@handle_errors
def data_cmd(
    config: ConfigOption = None,
    download: Annotated[bool, typer.Option(
        "--download", help="Download the IDX files into data/ even if another copy exists.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Locate, verify (SHA-256) and describe the Fashion-MNIST dataset."""
    from fmnist import console, data

    cfg = load_config(config)
    with console.DownloadProgress() as progress:
        if download:
            target = cfg.data.data_dir or config_module.project_root() / "data"
            data.download(cfg.data.mirror_url, target, cfg.data.download_timeout_s, progress)
            source = data.Source(target, "idx")
        else:
            source = data.locate(cfg.data, progress)
    info = data.describe(source)
    if as_json:
        console.print_json(info)
        return
    console.info(f"Dataset: {source.describe()} — checksums verified.")
    classes = list(info["train"]["per_class"])  # type: ignore[index]
    console.table("Fashion-MNIST", ["class", "train", "test"],
                  [[c, info["train"]["per_class"][c], info["test"]["per_class"][c]]  # type: ignore[index]
                   for c in classes])


@app.command("train")
@handle_errors
def train_cmd(
    config: ConfigOption = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (train.epochs).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (train.batch_size).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (train.seed).")] = None,
    name: Annotated[str | None, typer.Option(help="Model name: weights/<name>.keras.")] = None,
    limit: Annotated[int | None, typer.Option(
        help="Train on the first N shuffled images only (quick checks).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Train the CNN on the 60k training images; save weights, meta.json and a curve PNG."""
    from fmnist import console, train

    cfg = load_config(config, train__epochs=epochs, train__batch_size=batch_size,
                      train__seed=seed, model__name=name, train__limit=limit)
    result = train.train(cfg, console.TrainProgress())
    metrics = result.meta["metrics"]
    if as_json:
        console.print_json({"weights": str(result.weights), **metrics})
        return
    console.info(
        f"Saved {result.weights} (version {result.meta['version']}); curve: {result.curve_png}")
    console.out.print(
        f"test accuracy {metrics['test_accuracy']:.4f} after {metrics['epochs']} epochs in "
        f"{metrics['train_seconds']:.0f} s ({metrics['images_per_second']:.0f} img/s)",
        highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
