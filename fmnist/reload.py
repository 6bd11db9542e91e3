"""Hot reload: a new weights file is loaded, checked and warmed in the background, then swapped
in between two batches. A broken or incompatible file is refused and the old model serves on.

Triggers: the weights file changing on disk (with `serve --reload`), or SIGHUP.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fmnist.errors import FmnistError

log = logging.getLogger("fmnist.reload")


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
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reload", daemon=True)

    def _file_stamp(self) -> tuple[float, int] | None:
        try:
            stat = self.weights.stat()
            meta = self.weights.with_suffix(".meta.json").stat()
        except FileNotFoundError:
            return None
        return (max(stat.st_mtime, meta.st_mtime), stat.st_size)

    def start(self) -> Reloader:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request(self) -> None:
        """Reload now, even if the file looks unchanged (SIGHUP)."""
        self._stamp = None
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s if self.watch else None)
            self._wake.clear()
            if self._stop.is_set():
                return
            stamp = self._file_stamp()
            if stamp is None or stamp == self._stamp:  # request() cleared _stamp to force it
                continue
            self._stamp = stamp
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
