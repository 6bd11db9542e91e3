"""A soak: two Kafka workers for many minutes at a steady rate, a tenth of the requests bad,
one worker SIGKILLed every few minutes and started again, Kafka stopped and started once
(docs/reliability.md#soak; the harness is fmnist.testing.soak).

    .venv/bin/python benchmarks/soak.py --minutes 30 [--per-s 100] [--kill-every 240]
                                        [--restart-at 15] [--broker kafka] [--out FILE.json]

Half an hour is best left in the background; the results file is rewritten at the end of every
minute, so an interrupted run (Ctrl+C, SIGTERM) still leaves the figures so far (its phase says
so, and its ``lost`` then counts the requests still in flight, which were never drained):

    nohup .venv/bin/python benchmarks/soak.py --minutes 30 > soak.log 2>&1 &

Prints a table per minute (requests sent, p50/p99 of the good ones, each worker's RSS) and the
totals; writes everything to ``--out`` (default benchmarks/results/soak/<date>-<minutes>min.json).
Exits 1 if any request was lost, a bad input was not dead-lettered with its error code, or a
worker's RSS grew more than ``--rss-limit`` percent after its warm-up.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmnist.testing.soak import Plan, Soak, dump, rss_growth_ok  # noqa: E402


def table(results: dict[str, Any]) -> str:
    slots = sorted({key for m in results["minutes"] for key in m["rss_mb"]},
                   key=lambda k: (int(k.split(":")[0]), int(k.split(":")[1])))
    head = (f"{'min':>3} {'sent':>6} {'bad':>5} {'p50 ms':>8} {'p99 ms':>8}  "
            + " ".join(f"{'rss ' + s:>14}" for s in slots))
    rows = [head]
    for m in results["minutes"]:
        rss = " ".join(f"{m['rss_mb'].get(s, ''):>14}" for s in slots)
        rows.append(f"{m['minute']:>3} {m['sent']:>6} {m['bad']:>5} {m['p50_ms'] or '-':>8} "
                    f"{m['p99_ms'] or '-':>8}  {rss}")
    return "\n".join(rows)


def totals(results: dict[str, Any], rss_limit: float) -> str:
    r = results
    lines = [
        f"sent {r['sent']} ({r['good']} good, {r['bad']} bad)  answered {r['answered']} "
        f"(ok {r['answered_ok']}, error {r['answered_error']})  dead-lettered "
        f"{r['dead_lettered']}  lost {r['lost']}  duplicates {r['duplicates']} (dead letters "
        f"{r['duplicate_letters']})",
        f"dead letters by code: {r['dead_letters_by_code']}",
        f"good requests dead-lettered or answered with an error: "
        f"{r['good_dead_lettered_or_errored_count']} {r['good_dead_lettered_or_errored'][:5]}",
        f"bad inputs not dead-lettered with their code: {r['bad_mishandled_count']} "
        f"{r['bad_mishandled'][:5]}",
        f"SIGKILLs {r['kills']}, Kafka restarts {r['kafka_restarts']}, publishes retried "
        f"{r['failed_publishes']}, drain {r['drain_s']} s",
        f"RSS growth after {r['plan']['warmup_s']:.0f} s of each process's life "
        f"(limit {rss_limit:g} %):"]
    for p in r["processes"]:
        g = p["growth"]
        grown = (f"{g['from_mb']} -> {g['to_mb']} MB ({g['growth_pct']:+.2f} % over "
                 f"{g['over_s']} s)") if g else "lived too short to measure"
        lines.append(f"  worker {p['slot']} pid {p['pid']} ({p['started_s']} s to "
                     f"{p['ended_s'] if p['ended_s'] is not None else 'end'}, {p['how']}): "
                     f"{grown}")
    return "\n".join(lines)


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, timeout=10)
    return done.stdout.strip() + ("" if not subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
        text=True, timeout=10).stdout.strip() else " (with uncommitted changes in the tree)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--per-s", type=float, default=100.0, help="requests a second")
    ap.add_argument("--bad-share", type=float, default=0.10)
    ap.add_argument("--kill-every", type=float, default=240.0,
                    help="seconds between SIGKILLs (the two workers in turn); 0: none")
    ap.add_argument("--restart-at", type=float, default=None,
                    help="minute at which Kafka is stopped and started (default: half-way)")
    ap.add_argument("--warmup", type=float, default=180.0,
                    help="seconds into a process's life from which its RSS growth counts")
    ap.add_argument("--rss-limit", type=float, default=5.0, help="percent")
    ap.add_argument("--broker", choices=["kafka"], default="kafka",
                    help="kafka: a Kafka of its own on free ports (the shared one is untouched)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--note", default="", help="what else the results file should say")
    args = ap.parse_args(argv)
    plan = Plan(minutes=args.minutes, per_s=args.per_s, bad_share=args.bad_share,
                kill_every_s=args.kill_every, warmup_s=args.warmup,
                restart_at_s=None if args.restart_at is None else args.restart_at * 60)
    out = args.out or (ROOT / "benchmarks" / "results" / "soak"
                       / f"{time.strftime('%Y-%m-%d', time.gmtime())}-{args.minutes:g}min.json")
    meta = {"what": "two Kafka workers at a steady rate with bad inputs, SIGKILLs and a Kafka "
                    "restart; latency from the first publish attempt to the answer's arrival",
            "command": "python benchmarks/soak.py " + " ".join(sys.argv[1:] if argv is None
                                                               else argv),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit(),
            "note": args.note}

    def minute(results: dict[str, Any]) -> None:
        dump({**meta, **results}, out)
        done = round(results["seconds"] / 60) - 1  # the minute that just ended
        m = next((row for row in results["minutes"] if row["minute"] == done),
                 results["minutes"][-1])
        print(f"[{results['seconds']:.0f} s] minute {m['minute']}: sent {m['sent']}, p50 "
              f"{m['p50_ms']} p99 {m['p99_ms']} ms, rss {m['rss_mb']}; not yet answered: "
              f"{len(soak.run.open_requests()) if soak.run else '?'}", flush=True)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    # Stopping Kafka is part of the soak: the client's own reconnection warnings (one a second
    # per connection while it is down) would bury the table. The workers log to their files.
    for name in ("fmnist.brokers", "fmnist.brokers.kafka.librdkafka"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="fmnist-soak-") as tmp:
        soak = Soak(plan, Path(tmp), on_minute=minute)
        try:
            results = soak.run_soak()
        except KeyboardInterrupt:
            print("interrupted: writing the figures so far", file=sys.stderr)
            results = {**soak.results(), "phase": f"interrupted in {soak.phase}"} \
                if soak.run else {"phase": "interrupted before the traffic"}
            dump({**meta, **results}, out)
            return 130
    dump({**meta, **results}, out)
    print(table(results))
    print(totals(results, args.rss_limit))
    print(f"written to {out}")
    failed = (results["lost"] or results["bad_mishandled_count"]
              or not rss_growth_ok(results, args.rss_limit))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
