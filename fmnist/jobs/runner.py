"""Run one job: the same ``train`` and ``evaluate`` a local command runs, with the result as
plain data (pictures as base64 PNG) for the result event, and progress as events."""

from __future__ import annotations

import base64
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fmnist.brokers import Broker
from fmnist.config import Config
from fmnist.errors import ConfigError, DataError, FmnistError, ModelError
from fmnist.jobs.protocol import Job, JobRejected
from fmnist.model.train import StopCheck

Publish = Callable[[str, dict[str, Any]], None]  # (event type, fields)


class EventReporter:
    """A ``TrainReporter`` that publishes progress events: at most ``per_s`` batch updates a
    second, every completed epoch."""

    def __init__(self, publish: Publish, per_s: float) -> None:
        self.publish, self.interval = publish, 1.0 / per_s
        self.last = 0.0
        self.epochs = self.steps = 0

    def start(self, device: str, epochs: int, steps: int, summary: str,
              initial_epoch: int = 0) -> None:
        self.epochs, self.steps = epochs, steps
        self.publish("progress", {"phase": "setup", "device": device, "epochs": epochs,
                                  "steps": steps, "summary": summary,
                                  "initial_epoch": initial_epoch})

    def batch(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        self.publish("progress", {"phase": "fit", "epoch": epoch, "epochs": self.epochs,
                                  "step": step, "steps": self.steps, "logs": _finite(logs)})

    def epoch(self, epoch: int, logs: dict[str, float], seconds: float) -> None:
        self.publish("epoch", {"epoch": epoch, "epochs": self.epochs, "logs": _finite(logs),
                               "seconds": round(seconds, 2)})
        if epoch + 1 >= self.epochs:  # only a run that was not stopped gets here
            self.publish("progress", {"phase": "testing", "epochs": self.epochs})

    def finish(self) -> None:
        pass  # the result event ends the job's events


def _finite(logs: dict[str, float]) -> dict[str, float | None]:
    return {k: (round(v, 6) if v == v and abs(v) != float("inf") else None)
            for k, v in logs.items()}


def png(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def run(cfg: Config, job: Job, publish: Publish, checkpoint_dir: Path,
        stop: StopCheck) -> dict[str, Any]:
    """The result fields of a job that succeeded; raises what made it fail or stop."""
    if job.kind == "train":
        from fmnist import feedback
        from fmnist.model import train

        result = train.train(cfg, EventReporter(publish, cfg.jobs.progress_per_s),
                             checkpoint_dir, stop, extra=feedback.for_training(cfg))
        meta = result.meta
        return {"model": {"name": meta["name"], "version": meta["version"],
                          "weights": str(result.weights)},
                "metrics": meta["metrics"], "history": meta.get("history", {}),
                "pictures": {"curve": png(result.curve_png)}}
    from fmnist.model import evaluate

    publish("progress", {"phase": "evaluating", "model": cfg.model.name})
    with tempfile.TemporaryDirectory(prefix="fmnist-eval-") as out:
        ev = evaluate.evaluate(cfg, Path(out))
        return {"model": {"name": ev.model, "version": ev.version},
                "metrics": {"accuracy": ev.accuracy, "loss": ev.loss},
                "per_class": ev.per_class, "confusion": ev.confusion,
                "pictures": {"confusion": png(ev.confusion_png), "errors": png(ev.errors_png)}}


def publish_trained(cfg: Config, broker: Broker, weights: Path, job_id: str) -> dict[str, Any]:
    """Publish what a train job made to the model store (``registry.publish_trained``), with
    the job as its lineage; the result says where, or why not. Not promoted: that stays a
    person's decision (``fmnist models promote``)."""
    from fmnist.registry import ops
    from fmnist.registry.store import open_store

    try:
        store = open_store(cfg, broker)
        try:
            manifest = ops.publish(cfg, broker, store, weights, trained_by=job_id)
        finally:
            store.close()
    except FmnistError as exc:  # the model is trained and saved; say why it is not published
        return {"published": None, "publish_error": exc.message}
    return {"published": {"ref": manifest.ref, "store": store.where}}


def failure(exc: BaseException) -> dict[str, Any]:
    """The ``error`` of a failed result: a stable code, the message, what to do, exit code."""
    if isinstance(exc, JobRejected):
        return {"code": exc.code, "message": exc.message, "hint": exc.hint, "exit_code": 2}
    codes = {ConfigError: "invalid_options", DataError: "missing_data",
             ModelError: "missing_model"}
    if isinstance(exc, FmnistError):
        code = next((c for cls, c in codes.items() if isinstance(exc, cls)), "job_failed")
        return {"code": code, "message": exc.message, "hint": exc.hint,
                "exit_code": exc.exit_code}
    return {"code": "job_crashed", "message": f"{type(exc).__name__}: {exc}",
            "hint": "This is a bug in fmnist; the job worker's log has the traceback.",
            "exit_code": 1}


def checkpoint_dir(cfg: Config, job: Job) -> Path:
    """Where a train job's per-epoch checkpoint lives: next to the weights it will make."""
    return cfg.model.weights_dir / "jobs" / job.job_id


def resumable_epoch(folder: Path) -> int | None:
    """The completed epoch a checkpoint in ``folder`` holds (before loading it), if any."""
    import json

    try:
        return int(json.loads((folder / "state.json").read_text())["epochs_done"])
    except (OSError, ValueError, KeyError):
        return None

