"""A request that kills the worker process, and the crash-loop scenario around it.

``python -m fmnist.testing.crashing serve ...`` is `fmnist serve` whose image decoder kills its
own process (SIGKILL: no exception, no answer, no commit, as a native crash or the OOM killer
would) when an image carries ``MARK``. The same image is a valid PNG to any other worker.
``crash_loop`` runs two such workers under a supervisor that restarts whichever dies, as
Kubernetes would, and checks that the guard (fmnist/serving/crashes.py) ends the loop.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from fmnist.serving import protocol
from fmnist.testing.processes import FMNIST, WorkerProcess
from fmnist.testing.run import IMAGES, WORKER_START_S, Report, Run
from fmnist.testing.waiting import poll_until

MARK = b"fmnist-test: kill the worker that decodes this"


def marked(png: bytes) -> bytes:
    """``png`` with a tEXt chunk holding MARK before its IEND (decoders skip it)."""
    body = b"Comment\x00" + MARK
    chunk = (struct.pack(">I", len(body)) + b"tEXt" + body
             + struct.pack(">I", zlib.crc32(b"tEXt" + body)))
    end = png.rindex(b"IEND") - 4
    return png[:end] + chunk + png[end:]


def _kill_on_mark() -> None:
    import fmnist.imaging as imaging

    decode = imaging.decode

    def deadly(payload: bytes, cfg: Any) -> Any:
        if MARK in payload:
            os.kill(os.getpid(), signal.SIGKILL)
        return decode(payload, cfg)

    imaging.decode = deadly


class Fleet:
    """Workers in fixed slots, each with its own journal folder (its own host or pod volume);
    ``supervise`` restarts a dead one in its slot."""

    def __init__(self, run: Run, slots: int, env: dict[str, str]) -> None:
        self.run, self.env = run, env
        self.deaths: list[tuple[float, int]] = []  # (time.monotonic(), slot)
        self.workers: list[WorkerProcess] = [self._start(slot) for slot in range(slots)]

    def _start(self, slot: int) -> WorkerProcess:
        run = self.run
        worker = WorkerProcess(
            run.topics, run.workdir / f"worker-{slot}-{len(run.workers)}.log",
            command=[sys.executable, "-m", "fmnist.testing.crashing", "serve", "--quiet"],
            env={**run.env, **self.env,
                 "FMNIST_SERVE__JOURNAL_DIR": str(run.workdir / f"journal-{slot}")})
        run.workers.append(worker)
        return worker

    def supervise(self) -> None:
        for slot, worker in enumerate(self.workers):
            if not worker.alive():
                self.deaths.append((time.monotonic(), slot))
                worker.log.close()
                self.workers[slot] = self._start(slot)


def crash_loop(broker_name: str, workdir: Path, around: int = 40, max_crashes: int = 2
               ) -> Report:
    """Two workers; one marked request among ``around`` good ones on each side, sent at once
    so that it shares a batch. Every good request must be answered, the marked one
    dead-lettered as crashed_worker after a bounded number of deaths and never handled again."""
    env = {"FMNIST_SERVE__MAX_CRASHES": str(max_crashes), "FMNIST_PUBSUB__ACK_DEADLINE_S": "10"}
    with Run(broker_name, workdir) as run:
        run.open()
        fleet = Fleet(run, 2, env)
        run.wait_answered(run.send_good("warm", 20), timeout=WORKER_START_S)
        deadly = "deadly"
        burst = [*run.good("before", around),
                 (deadly, marked(IMAGES["sneaker7.png"]),
                  protocol.request_headers(deadly, "image/png"), None),
                 *run.good("after", around, around)]
        started = time.monotonic()
        run.send(burst)

        def settled() -> bool:
            fleet.supervise()
            run.pump()
            return not run.unanswered() and bool(run.letters.get(deadly))

        poll_until(settled, timeout=240, interval=0.05, message="every answer and the letter")
        settled_s = time.monotonic() - started
        deaths_then = len(fleet.deaths)
        # Refused, not handled again: a while more with both workers up and more requests.
        later = run.send_good("later", 20)

        def later_answered() -> bool:
            fleet.supervise()
            run.pump()
            return not run.unanswered(later)

        poll_until(later_answered, timeout=WORKER_START_S, interval=0.05,
                   message="the requests after the refusal")
        time.sleep(3.0)
        fleet.supervise()
        run.drain(quiet_s=1.0)
        answer = run.answers[deadly]
        letters = run.letters[deadly]
        logs = "\n".join(w.output() for w in run.workers)
        report = run.report(
            f"a request that kills the worker, max_crashes {max_crashes}",
            deaths=deaths_then, deaths_after=len(fleet.deaths) - deaths_then,
            settled_s=round(settled_s, 1),
            answer_codes=[a.get("error", {}).get("code") for a in answer],
            letter_codes=[m.headers.get("dlq_error_code", "") for m in letters],
            reported=logs.count("reported 1 dead worker process"),
            good_errors=sum(1 for rid, a in run.answers.items() if rid != deadly
                            and a[0].get("status") == "error"),
            note=f"{deaths_then} worker deaths, then dead-lettered {settled_s:.0f} s after sending")
        for worker in run.workers:
            worker.stop(timeout=30)
        return report


if __name__ == "__main__":
    _kill_on_mark()
    sys.argv[0] = FMNIST[-1]
    from fmnist.cli import main

    main()
