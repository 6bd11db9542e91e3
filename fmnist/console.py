"""The only module that imports rich: progress bars, tables and the error printer.

Results go to stdout; progress, logs and errors go to stderr, so `--json` output pipes cleanly.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

# Piped output gets a fixed, wide width instead of rich's 80 columns, so ids and paths in
# tables are not cut; a terminal keeps its own width.
out = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 140)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_json_line(data: Any) -> None:
    sys.stdout.write(json.dumps(data, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


def error(message: str, hint: str | None = None) -> None:
    # soft_wrap: a path or address in an error must stay on one line to be copied.
    err.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        err.print(f"[yellow]Hint:[/] {escape(hint)}", highlight=False, soft_wrap=True)


def info(message: str) -> None:
    err.print(message, highlight=False)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]],
          no_wrap: Sequence[str] = ()) -> None:
    """``no_wrap``: columns never cut or wrapped (ids a user copies)."""
    t = Table(title=title, title_justify="left")
    for column in columns:
        t.add_column(column, no_wrap=column in no_wrap, justify="right" if column in (
            "confidence", "precision", "recall", "f1", "support", "images", "count",
            "attempts", "seconds") else "left")
    for row in rows:
        t.add_row(*(str(c) for c in row))
    out.print(t)


class TrainProgress:
    """Rich display for training: an epoch bar and a batch bar with loss, accuracy and ETA."""

    def __init__(self, redraw_every: int = 10) -> None:
        # A local run redraws every 10th batch: redrawing every batch costs more than the
        # batch on a small model. Progress events arrive a few a second: draw each.
        self.redraw_every = redraw_every
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=err, transient=False)
        self.epochs_task = self.batch_task = TaskID(0)
        self.epochs = 0

    def start(self, device: str, epochs: int, steps: int, summary: str,
              initial_epoch: int = 0) -> None:
        err.print(f"Training on [bold]{device}[/]: {summary}", highlight=False)
        if initial_epoch:
            err.print(f"Resuming from the checkpoint of epoch {initial_epoch}/{epochs}.",
                      highlight=False)
        self.epochs = epochs
        self.progress.start()
        self.epochs_task = self.progress.add_task("epochs", total=epochs,
                                                  completed=initial_epoch, stats="")
        self.batch_task = self.progress.add_task(f"epoch {initial_epoch + 1}", total=steps,
                                                 stats="")

    def batch(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        if step % self.redraw_every and step != self.progress.tasks[self.batch_task].total:
            return
        self.progress.update(self.batch_task, completed=step, description=f"epoch {epoch + 1}",
                             stats=f"loss {logs.get('loss', 0):.4f} acc {logs.get('accuracy', 0):.4f}")

    def epoch(self, epoch: int, logs: dict[str, float], seconds: float) -> None:
        val = (f" val_loss {logs['val_loss']:.4f} val_acc {logs['val_accuracy']:.4f}"
               if "val_loss" in logs else "")
        self.progress.console.print(
            f"epoch {epoch + 1}/{self.epochs}: loss {logs.get('loss', 0):.4f} "
            f"acc {logs.get('accuracy', 0):.4f}{val} ({seconds:.0f} s)", highlight=False)
        self.progress.update(self.epochs_task, completed=epoch + 1, stats=val.strip())
        if epoch + 1 >= self.epochs:
            self.progress.remove_task(self.batch_task)  # done: no empty "epoch N 0/…" bar left
        else:
            self.progress.reset(self.batch_task, description=f"epoch {epoch + 2}")

    def finish(self) -> None:
        self.progress.stop()


class DownloadProgress:
    """A byte-progress bar per downloaded file."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=err)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> DownloadProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, name: str, done: int, total: int | None) -> None:
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=total)
        self.progress.update(self.tasks[name], completed=done, total=total)


class ServeStatus:
    """A live one-line status for `fmnist serve`: state, counts, rate, batch size, latency."""

    def __init__(self, stats: Any, broker: str) -> None:
        from rich.live import Live

        self.stats = stats
        self.broker = broker
        self.live = Live(get_renderable=self.render, console=err, refresh_per_second=4,
                         transient=True)

    def render(self) -> str:
        s = self.stats
        p50, p99 = s.latency_ms(50), s.latency_ms(99)
        latency = f"p50 {p50:.1f} ms p99 {p99:.1f} ms" if p50 is not None else "no requests yet"
        return (f"{self.broker} {s.broker_state} | {s.processed} answered ({s.errors} errors) | "
                f"{s.rate():.1f} req/s | last batch {s.last_batch} | worker {latency}")

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        self.live.stop()


class JobView:
    """A job's events rendered as a local run looks: a line per stage, the same epoch and
    batch bars (from progress events), and what an interruption and a resumption were."""

    def __init__(self, broker: str) -> None:
        self.broker = broker
        self.bars: TrainProgress | None = None
        self.attempt_worker: str | None = None
        self.running = False
        self.job_id: str | None = None

    def detach(self) -> None:
        """Ctrl+C: leave the bars where they are, on their own lines."""
        self._close_bars()

    def __call__(self, e: dict[str, Any]) -> None:
        kind, job = e["type"], e["job_id"]
        self.job_id = job
        if kind == "submitted":
            who = e.get("submitted_by") or "?"
            info(f"Job {job} ({e.get('kind')}) queued on {self.broker} by {who}; "
                 "Ctrl+C detaches, the job goes on.")
        elif kind == "started":
            if self.running:  # started again with no result in between: its worker died
                self._close_bars()
                info(f"[yellow]Job interrupted[/] on {self.attempt_worker}: its worker stopped "
                     "without a result; the broker delivered the job again.")
            resumed = e.get("resumed_from_epoch")
            info(f"Started on job worker {e.get('worker_id')} (attempt {e.get('attempt', 1)})"
                 + (f", resuming after epoch {resumed}" if resumed else "") + ".")
            self.running, self.attempt_worker = True, e.get("worker_id")
        elif kind == "progress":
            self._progress(e)
        elif kind == "epoch" and self.bars is not None:
            self.bars.epoch(int(e["epoch"]), _numbers(e.get("logs")), float(e.get("seconds", 0)))
        elif kind == "interrupted":
            self._close_bars()
            self.running = False
            info(f"[yellow]Job interrupted[/] on {e.get('worker_id')} ({e.get('reason')}); it "
                 "waits for a job worker and resumes from its last completed epoch.")
        elif kind == "cancel_requested":
            info(f"Cancel requested by {e.get('requested_by')}.")
        elif kind == "result":
            self._close_bars()
            self.running = False

    def _progress(self, e: dict[str, Any]) -> None:
        phase = e.get("phase")
        if phase == "setup":
            self._close_bars()
            self.bars = TrainProgress(redraw_every=1)
            self.bars.start(str(e.get("device")), int(e["epochs"]), int(e["steps"]),
                            str(e.get("summary")), int(e.get("initial_epoch") or 0))
        elif phase == "fit" and self.bars is not None:
            self.bars.batch(int(e["epoch"]), int(e["step"]), _numbers(e.get("logs")))
        elif phase == "testing":
            self._close_bars()
            info("Testing, calibrating and saving the model on the job worker.")
        elif phase == "evaluating":
            info(f"Evaluating {e.get('model')} on the 10k test images.")

    def _close_bars(self) -> None:
        if self.bars is not None:
            self.bars.finish()
            self.bars = None


def _numbers(logs: Any) -> dict[str, float]:
    return {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
