"""Hot reload: a new weights file is loaded, checked and warmed in the background, then swapped
in between two batches. A broken or incompatible file is refused and the old model serves on.

Triggers: the weights file (or its meta.json) changing on disk (with `serve --reload`), or
SIGHUP. A change is loaded once the files have stopped changing for one poll interval, so
replacing both files, or a copy still being written, costs one load, not two or a refusal.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fmnist.errors import FmnistError

log = logging.getLogger("fmnist.serving.reload")


class Reloader:
    def __init__(self, weights: Path, load: Callable[[Path], Any], swap: Callable[[Any], None],
                 on_result: Callable[[str], None] | None = None, interval_s: float = 2.0,
                 watch: bool = True) -> None:
        self.weights = weights
        self.load = load
        self.swap = swap
        self.on_result = on_result or (lambda result: None)
        self.interval_s = interval_s
        self.watch = watch  # poll the file; without it, only request() (SIGHUP) reloads
        self._stamp = self._file_stamp()
        self._forced = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reload", daemon=True)

    def _file_stamp(self) -> tuple[int, ...] | None:
        """Inode, mtime and size of both files: a rename (`mv`, an atomic save) changes the
        inode even when it keeps an older mtime and the same size; an in-place write changes
        the mtime."""
        try:
            stats = [self.weights.stat(), self.weights.with_suffix(".meta.json").stat()]
        except FileNotFoundError:
            return None
        return tuple(v for st in stats for v in (st.st_ino, st.st_mtime_ns, st.st_size))

    def start(self) -> Reloader:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request(self) -> None:
        """Reload now, even if the file looks unchanged (SIGHUP). Safe in a signal handler."""
        self._forced = True
        self._wake.set()

    def _run(self) -> None:
        pending = None  # a changed stamp seen once; loaded when the next look finds it unchanged
        while not self._stop.is_set():
            self._wake.wait(self.interval_s if self.watch else None)
            self._wake.clear()
            if self._stop.is_set():
                return
            stamp = self._file_stamp()
            if self._forced:
                self._forced = False
            elif stamp is None or stamp == self._stamp:
                pending = None
                continue
            elif stamp != pending:  # still being written, or a second file follows: wait
                pending = stamp
                continue
            pending, self._stamp = None, stamp
            self.reload_now()

    def reload_now(self) -> bool:
        try:
            predictor = self.load(self.weights)
        except FmnistError as exc:
            log.error("reload refused, keeping the current model: %s", exc.message)
            self.on_result("refused")
            return False
        except Exception as exc:  # a damaged file can fail in many ways; none may stop serving
            log.error("reload refused, keeping the current model: %s", exc)
            self.on_result("refused")
            return False
        self.swap(predictor)
        log.info("now serving %s@%s", predictor.name, predictor.version)
        self.on_result("ok")
        return True
