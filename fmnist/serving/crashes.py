"""No crash loops: a request that kills the worker process is retried a bounded number of times,
then dead-lettered as ``crashed_worker`` without being handled again (docs/reliability.md#crash-loops).

An exception in a request is answered as an error by the handler. A request that kills the
process instead (a native crash in an image decoder or in XLA, the kernel's OOM killer) leaves
no answer and no commit, so the broker delivers it again, to this worker restarted or to
another one, which dies the same way: forever, taking the requests around it down too. Nothing
inside the dying process can record which request did it, so the record is made before:

* ``Journal``: each worker process keeps a small file of the source ids (Kafka
  topic/partition/offset, Pub/Sub message id: both stay the same across redeliveries) of the
  requests its handler holds: decoding, in the forward pass, being ranked. A live process holds
  an ``flock`` on its file; a file whose lock can be taken belongs to a process that died. A
  worker starting up claims the dead files of its own topic and group in the same folder (the
  same host or volume; in Kubernetes the pod's volume, which outlives a restarted container)
  and turns each into a ``CrashReport``.
* ``CrashReporter``: publishes those reports to ``broker.crash_topic`` and reads every worker's
  reports from it, so a request that crashed one worker is known to the others.
* ``Suspects`` and ``CrashGuard``: a request named by a report is *suspect*. The guard handles
  each suspect on its own, after the batch before it is finished, so when it crashes a process
  again it is the only request in flight: the proof. A request in flight when
  ``serve.max_crashes`` processes died, at least once alone, is answered with the error
  ``crashed_worker`` and dead-lettered, not handled. The other requests of a crashed batch
  were suspects too; handled alone, they are answered normally.

The bound: ``max_crashes`` deaths once every worker knows the reports. A worker that takes the
request before a report reaches it (Pub/Sub delivers a dead worker's messages again once their
lease runs out, to any worker) dies once more and reports that too: at most one death more per
worker.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from fmnist.brokers import Broker, Consumer, Message, OutMessage, Producer
from fmnist.config import Config
from fmnist.errors import BrokerError, ConfigError
from fmnist.serving import protocol
from fmnist.serving.handler import BatchResult, PredictionHandler, Prepared

log = logging.getLogger("fmnist.serving.crashes")
CRASHED_WORKER = "crashed_worker"
_PREFIX, _SUFFIX = "inflight-", ".json"
STALE_S = 24 * 3600  # a dead journal this old names requests long since handled or expired
MAX_JOURNAL_BYTES = 1 << 20
KEEP_SUSPECTS = 10_000  # source ids remembered (the oldest are forgotten first)
RETRY_S = 5.0
History = dict[str, tuple[tuple[str, ...], tuple[str, ...]]]


@dataclass(frozen=True)
class CrashReport:
    """What a worker process was handling when it died."""

    id: str  # its journal's file name: one per process
    worker_id: str
    pid: int
    died_at: float  # the journal's last write (time.time())
    in_flight: tuple[tuple[str, ...], ...]  # the batches in its handler, source ids
    # What it knew of the suspects it held: source id -> (ids of the reports of the deaths
    # it was in flight at, of those it was alone at). A restarted worker that claims this
    # report learns them with it, even where the broker keeps no history (Pub/Sub).
    history: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(
        default_factory=dict)

    @property
    def requests(self) -> list[str]:
        return [source for batch in self.in_flight for source in batch]

    @property
    def alone(self) -> str | None:
        """The one request in flight, when there was only one: the one that crashed it."""
        requests = self.requests
        return requests[0] if len(requests) == 1 else None

    def to_json(self) -> bytes:
        return json.dumps({"id": self.id, "worker_id": self.worker_id, "pid": self.pid,
                           "died_at": self.died_at, "in_flight": self.in_flight,
                           "history": self.history}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CrashReport:
        """ValueError if ``raw`` is not a report."""
        try:
            data = json.loads(raw)
            batches = tuple(tuple(str(s) for s in batch) for batch in data["in_flight"])
            return cls(str(data["id"]), str(data["worker_id"]), int(data["pid"]),
                       float(data["died_at"]), batches, _history(data.get("history", {})))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a crash report: {exc}") from None


def _history(raw: Any) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    return {str(source): (tuple(str(r) for r in deaths), tuple(str(r) for r in alone))
            for source, (deaths, alone) in dict(raw).items()}


class Journal:
    """This process's file of the batches its handler holds, rewritten when one comes or goes
    (one ``pwrite`` of a line, no fsync: a process that dies leaves its writes in the page
    cache; a machine that dies takes the workers' processes with it, not one request's)."""

    def __init__(self, folder: Path, topic: str, group: str, worker_id: str) -> None:
        self.folder, self.topic, self.group = folder, topic, group
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # Made under a name no claimant looks at and locked before it is renamed into
            # view: a starting worker must never take a live process's new file for a dead one.
            hidden = folder / f".new-{uuid.uuid4().hex}"
            self._fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.path = folder / f"{_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}{_SUFFIX}"
            os.rename(hidden, self.path)
        except OSError as exc:
            raise ConfigError(
                f"serve.journal_dir: cannot keep the in-flight journal in {folder} "
                f"({exc.strerror or exc}).",
                "Point FMNIST_SERVE__JOURNAL_DIR at a writable folder (in a container, on its "
                "volume), or set it to \"\" to run without the crash-loop guard "
                "(docs/reliability.md#crash-loops).") from None
        head = json.dumps({"topic": topic, "group": group, "worker_id": worker_id,
                           "pid": os.getpid()})
        self._head = (head[:-1] + ', "in_flight": ').encode()
        self._batches: dict[int, list[str]] = {}
        self._encoded: dict[int, bytes] = {}  # each batch's JSON, made once, not at every write
        self._history: dict[int, History] = {}
        self._next = 0
        self._write()

    def add(self, sources: list[str], history: History | None = None) -> int:
        """``history``: what is known of these requests' earlier deaths (suspects only)."""
        token, self._next = self._next, self._next + 1
        self._batches[token] = sources
        self._encoded[token] = orjson.dumps(sources)
        if history:
            self._history[token] = history
        self._write()
        return token

    def remove(self, token: int) -> None:
        self._history.pop(token, None)
        self._encoded.pop(token, None)
        if self._batches.pop(token, None) is not None:
            self._write()

    def holding(self) -> list[list[str]]:
        return list(self._batches.values())

    def _write(self) -> None:
        # One line; a longer earlier line's tail past it is cut by the truncate, and a reader
        # takes the first line only should the process die between the two calls.
        history = {s: h for known in self._history.values() for s, h in known.items()}
        line = b"".join((self._head, b"[", b",".join(self._encoded.values()),
                         b'], "history": ', orjson.dumps(history), b"}\n"))
        os.pwrite(self._fd, line, 0)
        os.ftruncate(self._fd, len(line))

    def close(self) -> None:
        """A clean exit: nothing was in flight, nothing to report."""
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)

    def claim_dead(self) -> list[CrashReport]:
        """The reports of the processes of this topic and group whose journals are here and
        whose locks are free (they died), their files deleted. Dead journals of other
        topics are left for their own workers, unless they hold nothing or are stale."""
        reports = []
        for path in sorted(self.folder.glob(f"{_PREFIX}*{_SUFFIX}")):
            if path == self.path:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue  # claimed by another worker meanwhile
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        continue  # its process lives
                    raise
                if not path.exists():
                    continue  # claimed and deleted by another worker while we waited
                report, ours = self._read_dead(fd, path)
                if report is not None and ours:
                    reports.append(report)
                if ours or report is None or time.time() - report.died_at > STALE_S:
                    path.unlink(missing_ok=True)
            finally:
                os.close(fd)
        return reports

    def _read_dead(self, fd: int, path: Path) -> tuple[CrashReport | None, bool]:
        """(its report, or None when nothing was in flight or it cannot be read; whether it
        belongs to this topic and group)."""
        raw = os.pread(fd, MAX_JOURNAL_BYTES, 0).split(b"\n", 1)[0]
        try:
            data = json.loads(raw)
            batches = tuple(tuple(str(s) for s in b) for b in data["in_flight"] if b)
            ours = (data["topic"], data["group"]) == (self.topic, self.group)
            report = CrashReport(path.name, str(data["worker_id"]), int(data["pid"]),
                                 os.fstat(fd).st_mtime, batches,
                                 _history(data.get("history", {})))
        except (ValueError, KeyError, TypeError):
            log.warning("in-flight journal %s cannot be read; deleted", path)
            return None, False
        return (report if report.in_flight else None), ours


class Suspects:
    """What the reports say of each request: in flight at how many deaths, how many alone.
    Learned by the reporter's thread, asked by the serve loop's (single dict reads)."""

    def __init__(self, max_crashes: int) -> None:
        self.max_crashes = max(1, max_crashes)
        self._lock = threading.Lock()
        self._reports: OrderedDict[str, None] = OrderedDict()
        # source id -> (the reports of the deaths it was in flight at, of those it was alone
        # at): sets of report ids, so a death learned twice (from a report and from a later
        # report's history) counts once
        self._crashes: OrderedDict[str, tuple[frozenset[str], frozenset[str]]] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._crashes)

    def learn(self, report: CrashReport) -> bool:
        """Whether it was new (a report is read back from the topic by its own writer too)."""
        with self._lock:
            if report.id in self._reports:
                return False
            self._reports[report.id] = None
            alone = report.alone
            for source in dict.fromkeys(report.requests):
                deaths, alone_at = self._crashes.pop(source, (frozenset(), frozenset()))
                earlier, earlier_alone = report.history.get(source, ((), ()))
                self._crashes[source] = (
                    deaths | {report.id, *earlier},
                    alone_at | {*earlier_alone, *((report.id,) if source == alone else ())})
            for memory in (self._reports, self._crashes):
                while len(memory) > KEEP_SUSPECTS:
                    memory.popitem(last=False)
            return True

    def deaths(self, source: str) -> tuple[int, int]:
        """(deaths it was in flight at, of which alone)."""
        deaths, alone = self._crashes.get(source, (frozenset(), frozenset()))
        return len(deaths), len(alone)

    def history(self, source: str) -> History:
        """What a journal keeps of ``source`` while it is handled alone."""
        if source not in self._crashes:
            return {}
        deaths, alone = self._crashes[source]
        return {source: (tuple(sorted(deaths)), tuple(sorted(alone)))}

    def refused(self, source: str) -> bool:
        deaths, alone = self.deaths(source)
        return deaths >= self.max_crashes and alone >= 1


class CrashGuard:
    """A ``BatchHandler`` around ``PredictionHandler``: journals what the handler holds,
    handles suspects one at a time and refuses those the reports convict."""

    def __init__(self, inner: PredictionHandler, journal: Journal, suspects: Suspects) -> None:
        self.inner = inner
        self.worker_id = inner.worker_id
        self.journal = journal
        self.suspects = suspects
        # finish() of the batches prepared, not yet finished, oldest first (one, normally: the
        # batch whose forward pass runs while the loop sends the one before it)
        self._open: OrderedDict[int, Callable[[], BatchResult]] = OrderedDict()

    @property
    def model(self) -> object:
        return self.inner.model

    def prepare(self, messages: list[Message]) -> Prepared:
        # The pipeline holds one prepared batch at a time: an older one still open was dropped
        # (a broker failure resets the pipeline) and is in nobody's hands any more.
        while len(self._open) > 1:
            self.journal.remove(self._open.popitem(last=False)[0])
        if not self.suspects:
            return self._journalled(messages)
        refused, alone, rest = [], [], []
        for message in messages:
            if self.suspects.refused(message.source_id):
                refused.append(message)
            elif self.suspects.deaths(message.source_id)[0]:
                alone.append(message)
            else:
                rest.append(message)
        if not refused and not alone:
            return self._journalled(messages)
        results = []
        if alone:
            for earlier in list(self._open.values()):
                earlier()  # nothing else in flight while a suspect is
        if alone:
            log.warning("%d request(s) of this batch were in flight when a worker process died "
                        "(%s); handling each alone", len(alone),
                        ", ".join(m.source_id for m in alone[:3]) + (", ..." if len(alone) > 3
                                                                     else ""))
        for message in alone:
            history = self.suspects.history(message.source_id)
            results.append(self._journalled([message], history).finish())
        if refused:
            results.append(self._refuse(refused))
        tail = self._journalled(rest) if rest else None

        def finish() -> BatchResult:
            done = [*results, tail.finish()] if tail is not None else results
            return BatchResult([m for r in done for m in r.out],
                               [o for r in done for o in r.outcomes],
                               max(r.inference_ms for r in done),
                               [x for r in done for x in r.labelled])

        return Prepared([*alone, *refused, *rest], finish,
                        tail.model if tail is not None else self.inner.model)

    def _journalled(self, messages: list[Message], history: History | None = None) -> Prepared:
        token = self.journal.add([m.source_id for m in messages], history)
        try:
            prepared = self.inner.prepare(messages)
        except BaseException:
            self.journal.remove(token)
            raise
        done: list[BatchResult] = []

        def finish() -> BatchResult:
            if not done:
                try:
                    done.append(prepared.finish())
                finally:
                    self._open.pop(token, None)
                    self.journal.remove(token)
            return done[0]

        self._open[token] = finish
        return Prepared(messages, finish, prepared.model)

    def _refuse(self, messages: list[Message]) -> BatchResult:
        for message in messages:
            deaths, alone = self.suspects.deaths(message.source_id)
            log.error("request %s refused: in flight when %d worker processes died (%d alone); "
                      "dead-lettered as %s", message.source_id, deaths, alone, CRASHED_WORKER)
        deaths = max(self.suspects.deaths(m.source_id)[0] for m in messages)
        error = protocol.RequestError(
            CRASHED_WORKER, f"the worker process died {deaths} times while handling this "
            "request, at least once with no other request in flight; it is not handled again "
            "(docs/reliability.md#crash-loops)")
        return self.inner.refuse(messages, error)


class CrashReporter:
    """Publishes this process's claims to ``broker.crash_topic`` and reads every worker's
    reports from it into ``suspects``, in a thread of its own with its own clients; a broker
    outage only delays it (retried every ``RETRY_S``)."""

    def __init__(self, cfg: Config, broker: Broker, suspects: Suspects,
                 claimed: list[CrashReport]) -> None:
        self.cfg, self.broker, self.suspects = cfg, broker, suspects
        self.topic = cfg.broker.crash_topic
        self._pending = list(claimed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crash-reports", daemon=True)

    def start(self) -> CrashReporter:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        consumer: Consumer | None = None
        producer: Producer | None = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    if self.cfg.broker.create_topics:
                        self.broker.ensure_topics([self.topic])
                    # From the start of what the topic keeps (Kafka): reports from before
                    # this worker started count too. Pub/Sub keeps none for a new reader.
                    consumer = self.broker.consumer(self.topic, from_beginning=True)
                if self._pending:
                    producer = producer or self.broker.producer()
                    producer.publish([OutMessage(self.topic, r.to_json(), key=r.id)
                                      for r in self._pending], timeout_s=10)
                    log.info("reported %d dead worker process(es) to %s", len(self._pending),
                             self.topic)
                    self._pending = []
                for message in consumer.next_batch(100, timeout_s=1.0):
                    self._learn(message)
            except BrokerError as exc:
                log.warning("crash reports (%s): %s; retrying in %.0f s", self.topic,
                            exc.message, RETRY_S)
                for client in (consumer, producer):
                    _close_quietly(client)
                consumer = producer = None
                self._stop.wait(RETRY_S)
        for client in (consumer, producer):
            _close_quietly(client)

    def _learn(self, message: Message) -> None:
        try:
            report = CrashReport.from_json(message.value)
        except ValueError as exc:
            log.warning("%s: skipped %s: %s", self.topic, message.source_id, exc)
            return
        if self.suspects.learn(report):
            log.warning("worker %s (pid %d) died with %d request(s) in flight; they are handled "
                        "one at a time from now on", report.worker_id, report.pid,
                        len(report.requests))


def _close_quietly(client: Any) -> None:
    try:
        if client is not None:
            client.close()
    except Exception:  # closing a broken client may fail too
        pass


@dataclass
class Guarded:
    """What ``guard`` started; ``around`` makes the handler to serve with."""

    journal: Journal | None = None
    suspects: Suspects | None = None
    reporter: CrashReporter | None = None

    def around(self, handler: PredictionHandler) -> CrashGuard | PredictionHandler:
        if self.journal is None or self.suspects is None:
            return handler
        return CrashGuard(handler, self.journal, self.suspects)

    def close(self) -> None:
        if self.reporter is not None:
            self.reporter.stop()
        if self.journal is not None and not self.journal.holding():
            self.journal.close()


def guard(cfg: Config, broker: Broker, group: str, worker_id: str) -> Guarded:
    """The crash-loop guard of a worker of ``group`` (``serve.journal_dir`` "" turns it off):
    claims the journals of this topic's dead workers, knows their suspects at once and starts
    the reporter. Called before the model loads, so the reports are out before this worker
    joins its group and takes requests."""
    if not cfg.serve.journal_dir:
        return Guarded()
    folder = Path(cfg.serve.journal_dir).expanduser()
    journal = Journal(folder, cfg.broker.request_topic, group, worker_id)
    suspects = Suspects(cfg.serve.max_crashes)
    claimed = journal.claim_dead()
    for report in claimed:
        suspects.learn(report)
        log.warning("a worker process (%s, pid %d) died with %d request(s) in flight; they are "
                    "handled one at a time", report.worker_id, report.pid, len(report.requests))
    return Guarded(journal, suspects, CrashReporter(cfg, broker, suspects, claimed).start())
