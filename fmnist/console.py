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


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for column in columns:
        t.add_column(column, justify="right" if column[:1].islower() and column in (
            "confidence", "precision", "recall", "f1", "support", "images", "count") else "left")
    for row in rows:
        t.add_row(*(str(c) for c in row))
    out.print(t)


class TrainProgress:
    """Rich display for training: an epoch bar and a batch bar with loss, accuracy and ETA."""

    def __init__(self) -> None:
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
        if step % 10 and step != self.progress.tasks[self.batch_task].total:
            return  # redrawing every batch costs more than the batch on a small model
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
