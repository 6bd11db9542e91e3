"""Logging set-up: readable text for people, JSON lines for machines, both on stderr.

JSON lines carry timestamp, level, event, logger, worker id and, where one applies, the request
id (pass ``extra={"request_id": ...}``). Nothing logs per request at INFO: under load that
would cost more than the inference.

With JSON, what Python would otherwise print raw to stderr (warnings, an exception that escapes
a thread) goes through logging too, so a log shipper sees one JSON object per line.
TensorFlow's native start-up chatter is kept off stderr by ``runtime.quiet_native_stderr``.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, worker_id: str) -> None:
        super().__init__()
        self.worker_id = worker_id

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
            "worker_id": self.worker_id,
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(log_format: str = "text", level: str = "INFO", worker_id: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker_id))
        logging.captureWarnings(True)
        threading.excepthook = _log_thread_exception
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Client libraries are chatty at INFO (connection churn); their warnings still show.
    for noisy in ("kafka", "google", "urllib3", "absl"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread else "?"
    logging.getLogger("fmnist").error(
        "uncaught exception in thread %s", name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))  # type: ignore[arg-type]
