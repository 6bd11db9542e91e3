"""`fmnist models`: the model registry on the command line (docs/models.md).

Its own module because it is a group of five commands; ``fmnist.cli`` adds it as ``models``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from fmnist.cli import BrokerOption, ConfigOption, JsonOption, handle_errors, job_broker

WaitOption = Annotated[int, typer.Option(
    "--wait", metavar="WORKERS", help="Wait until this many workers announce that they serve "
    "it (or refused it); exit 3 if one refused, 4 after --timeout.")]
TimeoutOption = Annotated[float, typer.Option("--timeout", help="Seconds --wait waits.")]

models_app: typer.Typer = typer.Typer(
    help="Models every worker reaches through the broker: publish, promote, roll back, list and "
         "show.", no_args_is_help=True)


@contextmanager
def registry(config: Path | None, broker: str | None) -> Iterator[tuple[Any, Any, Any]]:
    from fmnist.registry.store import open_store

    cfg, b = job_broker(config, broker)
    try:
        store = open_store(cfg, b)
        try:
            yield cfg, b, store
        finally:
            store.close()
    finally:
        b.close()


def when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def percent(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, (int, float)) else "-"


@models_app.command("list")
@handle_errors
def list_cmd(name: Annotated[str | None, typer.Argument(help="Only this model name.")] = None,
             broker: BrokerOption = None, config: ConfigOption = None,
             as_json: JsonOption = False) -> None:
    """Every published model, newest first; * marks the version serving.

    Examples:

        fmnist models list --broker kafka
        fmnist models list fmnist --broker pubsub --json
    """
    from fmnist import console
    from fmnist.registry import ops

    with registry(config, broker) as (cfg, b, store):
        rows = ops.listing(store, name)
        where = store.where
    if as_json:
        console.print_json(rows)
        return
    console.table(f"{len(rows)} model(s) in {where}",
                  ["", "model", "test accuracy", "MB", "published", "by", "trained by job"],
                  [["*" if r["serving"] else "", f"{r['name']}@{r['version']}",
                    percent(r["test_accuracy"]), f"{r['size'] / 1e6:.1f}", when(r["published_at"]),
                    r["published_by"], r["trained_by_job"] or "-"] for r in rows],
                  no_wrap=("model",))


@models_app.command("show")
@handle_errors
def show_cmd(ref: Annotated[str | None, typer.Argument(
                 help="NAME or NAME@VERSION (default: model.name).")] = None,
             broker: BrokerOption = None, config: ConfigOption = None,
             as_json: JsonOption = False) -> None:
    """A model's versions, what each worker serves, refusals and live feedback accuracy.

    Examples:

        fmnist models show --broker kafka
        fmnist models show fmnist@3f2a9c --broker pubsub --json
    """
    from fmnist import console
    from fmnist.registry import ops

    with registry(config, broker) as (cfg, b, store):
        shown = ops.show(cfg, b, store, ref or cfg.model.name)
    if as_json:
        console.print_json(shown)
        return
    pointer = shown["serving"]
    console.info(f"{shown['name']} in {shown['store']}: " + (
        f"serving {pointer['version']} ({pointer['action'].replace('_', ' ')} by {pointer['by']} "
        f"at {when(pointer['at'])}, generation {pointer['generation']}; before it: "
        f"{', '.join(pointer['history'][:3]) or 'none'})" if pointer else "nothing promoted"))
    console.table("versions", ["model", "test accuracy", "feedback accuracy", "published",
                               "trained by job", "parent", "refused by"],
                  [[v["ref"], percent(v["metrics"].get("test_accuracy")),
                    (f"{v['feedback']['accuracy']:.2%} of {v['feedback']['labelled']}"
                     if v.get("feedback") else "-"), when(v["published_at"]),
                    v["lineage"].get("trained_by_job") or "-", v["lineage"].get("parent") or "-",
                    ", ".join(f"{r['worker_id']} ({r['reason']})" for r in v["refusals"]) or "-"]
                   for v in shown["versions"]], no_wrap=("model",))
    console.table("workers (their last announcement)", ["worker", "serving", "since"],
                  [[w, s["version"], when(s["since"])] for w, s in shown["workers"].items()],
                  no_wrap=("worker",))
    for r in shown["refusals"][-5:]:
        console.info(f"refused {r['version']} on {r['worker_id']} at {when(r['time'])}: "
                     f"{r['reason']}: {r['detail']}")


@models_app.command("publish")
@handle_errors
def publish_cmd(weights: Annotated[Path | None, typer.Argument(
                    help="A .keras file with its .meta.json beside it (default: the configured "
                         "model's).")] = None,
                name: Annotated[str | None, typer.Option(
                    help="Publish under this name (default: the name in its meta.json).")] = None,
                promote: Annotated[bool, typer.Option(
                    "--promote", help="Promote it right after publishing.")] = False,
                broker: BrokerOption = None, config: ConfigOption = None,
                as_json: JsonOption = False) -> None:
    """Upload a local model to the store, so every worker can fetch it.

    Examples:

        fmnist models publish weights/fmnist.keras --broker kafka
        fmnist models publish weights/fmnist.keras --broker pubsub --promote
    """
    from fmnist import console
    from fmnist.registry import ops

    with registry(config, broker) as (cfg, b, store):
        manifest = ops.publish(cfg, b, store, weights or cfg.weights_path, name=name)
        pointer = ops.promote(cfg, b, store, manifest.ref) if promote else None
    if as_json:
        console.print_json({"published": manifest.as_dict(),
                            "serving": pointer.as_dict() if pointer else None})
        return
    console.info(f"published {manifest.ref} ({manifest.size / 1e6:.1f} MB, test accuracy "
                 f"{percent(manifest.metrics.get('test_accuracy'))})")
    if pointer:
        console.info(f"promoted {manifest.ref} (generation {pointer.generation})")
    else:
        console.info(f"serve it everywhere: fmnist models promote {manifest.ref} "
                     f"--broker {cfg.serve.broker}")


@models_app.command("promote")
@handle_errors
def promote_cmd(ref: Annotated[str, typer.Argument(help="NAME@VERSION (a version prefix will do).")],
                min_accuracy: Annotated[float | None, typer.Option(
                    help="Refuse unless its test accuracy is at least this (0-1).")] = None,
                max_drop: Annotated[float | None, typer.Option(
                    help="Refuse if its test accuracy is more than this under the serving "
                         "model's (0-1).")] = None,
                wait: WaitOption = 0, timeout: TimeoutOption = 60.0,
                broker: BrokerOption = None, config: ConfigOption = None,
                as_json: JsonOption = False) -> None:
    """Make a published version the one every worker serves.

    Workers fetch, check (SHA-256, input spec, canary images) and warm it, then switch between
    two batches; a worker that refuses it keeps serving and says why (`fmnist models show`).

    Examples:

        fmnist models promote fmnist@3f2a9c1d0b7e --broker kafka
        fmnist models promote fmnist@latest --min-accuracy 0.92 --max-drop 0.005 --wait 2
    """
    from fmnist.registry import ops

    with registry(config, broker) as (cfg, b, store):
        watch = ops.FleetWatch(cfg, b) if wait else None
        try:
            pointer = ops.promote(cfg, b, store, ref, min_accuracy, max_drop)
            report(cfg, pointer, "promoted", watch, wait, timeout, as_json)
        finally:
            if watch:
                watch.close()


def report(cfg: Any, pointer: Any, done: str, watch: Any, workers: int, timeout_s: float,
           as_json: bool) -> None:
    """Say what was done; with ``--wait N``, follow the fleet until N workers took it."""
    from fmnist import console
    from fmnist.errors import BrokerTimeout, ModelError

    if not as_json:
        console.info(f"{done} {pointer.name}@{pointer.version} (generation "
                     f"{pointer.generation})" + ("" if watch else
                     f"; workers switch within seconds: fmnist models show {pointer.name} "
                     f"--broker {cfg.serve.broker}"))

    def seen(e: dict[str, Any]) -> None:
        if not as_json:
            console.info(f"  {e['worker_id']}: " + (
                f"serving it ({e['prepare_s']:.2f} s to fetch, check and warm)"
                if e["type"] == "serving" and e.get("prepare_s") is not None else
                "serving it" if e["type"] == "serving" else
                f"REFUSED it ({e.get('reason')}: {e.get('detail')})"))

    answers = watch.wait(pointer, workers, timeout_s, seen) if watch else {}
    if as_json:
        console.print_json({**pointer.as_dict(), "workers": answers})
    refused = [e for e in answers.values() if e["type"] == "refused"]
    if refused:
        raise ModelError(f"{len(refused)} worker(s) refused {pointer.name}@{pointer.version} "
                         "and serve the previous version.",
                         f"Roll back: fmnist models rollback {pointer.name} --broker "
                         f"{cfg.serve.broker}")
    if watch and len(answers) < workers:
        raise BrokerTimeout(f"{len(answers)} of {workers} worker(s) announced "
                            f"{pointer.name}@{pointer.version} within {timeout_s:g} s.",
                            f"See where each is: fmnist models show {pointer.name} --broker "
                            f"{cfg.serve.broker}")


@models_app.command("rollback")
@handle_errors
def rollback_cmd(name: Annotated[str | None, typer.Argument(
                     help="Model name (default: model.name).")] = None,
                 wait: WaitOption = 0, timeout: TimeoutOption = 60.0,
                 broker: BrokerOption = None, config: ConfigOption = None,
                 as_json: JsonOption = False) -> None:
    """Serve again the version served before the current one.

    Examples:

        fmnist models rollback --broker kafka
        fmnist models rollback fmnist --broker pubsub --wait 2
    """
    from fmnist.registry import ops

    with registry(config, broker) as (cfg, b, store):
        watch = ops.FleetWatch(cfg, b) if wait else None
        try:
            pointer = ops.rollback(cfg, b, store, name or cfg.model.name)
            report(cfg, pointer, "rolled back to", watch, wait, timeout, as_json)
        finally:
            if watch:
                watch.close()
