"""Run every fault scenario against the local brokers and print what happened to each request.

    scripts/faults [--count N] [--brokers kafka,pubsub] [--only NAME ...] [--timeout S]

Scenarios (fmnist/testing/scenarios.py; the tests in tests/integration assert on the same
runs): poison requests in a stream of good ones; `kill -9` of a worker mid-stream; SIGTERM
during a busy stream, and a second signal; a worker started before Kafka; Kafka stopped and
restarted under load (on a Kafka of its own, on free ports); workers joining and leaving a
consumer group; a request that kills every worker process which handles it (fmnist/testing/
crashing.py). Each runs real `fmnist serve` processes on private topics.

Prints a Markdown table (scenario, broker, sent, answered, duplicates, lost, error responses,
DLQ records, wrong labels, seconds). Exit status 1 if any scenario lost a request or could not
run to its end, 0 otherwise. Bounded: at most --count requests per scenario, every wait has a
timeout, the whole run stops after --timeout seconds. Loopback only: it refuses brokers that
are not on this machine, and starts its own Kafka on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fmnist import config
from fmnist.testing import crashing, scenarios
from fmnist.testing.scenarios import OwnKafka, Report

SCENARIOS = ("poison", "crash", "sigterm", "crash-loop", "kafka-late", "kafka-restart",
             "rebalance")
MAX_COUNT = 10_000


class OutOfTime(Exception):
    pass


def loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def expired(signum: int, frame: object) -> None:
        raise OutOfTime(f"the run went over --timeout {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def plan(args: argparse.Namespace, workdir: Path, own: Callable[[], OwnKafka]
         ) -> list[tuple[str, str, Callable[[], list[Report]]]]:
    """(scenario, broker, how to run it) in the order they run."""
    count = args.count
    steps: list[tuple[str, str, Callable[[], list[Report]]]] = []
    for broker in args.brokers:
        def d(name: str, b: str = broker) -> Path:
            return workdir / f"{name}-{b}"

        steps += [
            ("poison", broker, lambda b=broker: [scenarios.poison(b, d("poison", b))]),
            ("crash", broker,
             lambda b=broker: [scenarios.crash(b, d("crash", b), count=count)]),
            ("sigterm", broker,
             lambda b=broker: list(scenarios.sigterm(b, d("sigterm", b), count=count))),
            ("crash-loop", broker,
             lambda b=broker: [crashing.crash_loop(b, d("crash-loop", b))]),
        ]
    if "kafka" in args.brokers:
        steps += [
            ("kafka-late", "kafka", lambda: [scenarios.kafka_late(own(), workdir / "late")]),
            ("kafka-restart", "kafka",
             lambda: [scenarios.kafka_restart(own(), workdir / "restart", count=count)]),
            ("rebalance", "kafka", lambda: [scenarios.rebalance(workdir / "rebalance")]),
        ]
    return [step for step in steps if not args.only or step[0] in args.only]


def table(reports: list[Report]) -> str:
    header = ["scenario", "broker", "sent", "answered", "duplicates", "lost", "error responses",
              "DLQ records", "wrong labels", "seconds", "note"]
    rows = [header, ["---"] * len(header)] + [r.row() for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     + " |" for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000,
                        help=f"requests per stream scenario (at most {MAX_COUNT:,})")
    parser.add_argument("--brokers", default="kafka,pubsub", help="kafka, pubsub or both")
    parser.add_argument("--only", nargs="*", choices=SCENARIOS, help="run only these")
    parser.add_argument("--timeout", type=float, default=1200, help="for the whole run (s)")
    parser.add_argument("--keep", action="store_true", help="keep worker logs even on success")
    args = parser.parse_args()
    args.brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    if not 1 <= args.count <= MAX_COUNT or not set(args.brokers) <= {"kafka", "pubsub"}:
        parser.error(f"--count must be 1..{MAX_COUNT:,}; --brokers kafka and/or pubsub")

    cfg = config.load(env={})  # the scenarios use the defaults too, never FMNIST_* variables
    for what, address in (("kafka.bootstrap_servers", cfg.kafka.bootstrap_servers),
                          ("pubsub.emulator_host", cfg.pubsub.emulator_host)):
        if not all(loopback(a.strip()) for a in address.split(",")):
            print(f"faults: {what} = {address!r} is not on this machine; refusing.",
                  file=sys.stderr)
            return 2

    workdir = Path(tempfile.mkdtemp(prefix="fmnist-faults-"))
    kafka: list[OwnKafka] = []

    def own() -> OwnKafka:
        if not kafka:
            kafka.append(OwnKafka(workdir / "own-kafka"))
        return kafka[0]

    reports: list[Report] = []
    started = time.monotonic()
    try:
        with deadline(args.timeout):
            for name, broker, run in plan(args, workdir, own):
                print(f"faults: {name} on {broker} ...", file=sys.stderr, flush=True)
                began = time.monotonic()
                try:
                    got = run()
                except OutOfTime:
                    raise
                except Exception as exc:  # noqa: BLE001 - report it and go on with the rest
                    message = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
                    got = [Report(name, broker, seconds=time.monotonic() - began,
                                  note=f"FAILED: {message}", failure=message)]
                    traceback.print_exc(file=sys.stderr)
                for report in got:
                    report.facts.clear()
                    print(f"faults:   {' | '.join(report.row())}"
                          + (f"  FAILED: {report.failure}" if report.failure else ""),
                          file=sys.stderr, flush=True)
                reports += got
    except OutOfTime as exc:
        reports.append(Report("(the rest)", "-", note=f"FAILED: {exc}", failure=str(exc)))
    finally:
        if kafka:
            try:
                kafka[0].down()
            except Exception as exc:  # noqa: BLE001
                print(f"faults: could not stop the own Kafka: {exc}", file=sys.stderr)

    print(table(reports))
    failed = [r for r in reports if r.failure or r.lost]
    print(f"\n{len(reports)} scenario runs in {time.monotonic() - started:.0f} s; "
          f"lost: {sum(r.lost for r in reports)}; duplicates: "
          f"{sum(r.duplicates for r in reports)}.")
    for r in failed:
        print(f"FAILED {r.scenario} ({r.broker}): "
              f"{r.failure or f'{r.lost} request(s) lost'}")
    if failed or args.keep:
        print(f"worker logs: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
