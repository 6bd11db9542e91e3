"""How fast a fleet follows a promotion and a rollback, idle and under load, and a cold start.

    .venv/bin/python benchmarks/rollout.py [--brokers kafka pubsub] [--rates 0 200]
                                           [--rounds 3] [--out FILE.json]

Each round is ``fmnist.testing.rollout.rollout``: v1 promoted, two workers start with empty
homes (each fetches v1 from the store: the cold start), requests flow at the rate, v2 is
promoted, then rolled back. Convergence is timed from each command to each worker's
``serving`` announcement (the swap is done) and to its first answer from the new version;
a round's figure is its slowest worker. Prints medians over the rounds, with lost and failed
requests (which must be 0), and writes every round's facts to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fmnist.testing import rollout


def one(broker: str, per_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fmnist-rollout-") as tmp:
        report = rollout.rollout(broker, Path(tmp), per_s=per_s)
    f = report.facts
    return {"sent": report.sent, "lost": report.lost, "errors": report.error_responses,
            "stale_answers": f["stale_answers"],
            "promote_s": max(f["promote_s"].values()), "rollback_s": max(f["rollback_s"].values()),
            "prepare_s": max(v for v in f["prepare_s"].values() if v is not None),
            "first_new_answer_s": max([v for v in f["first_v2_answer_s"].values() if v] or [0]),
            "cold_start_s": max(f["cold_start_s"].values()), "facts": f}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", nargs="+", default=["kafka", "pubsub"])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.0, 200.0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for broker in args.brokers:
        for rate in args.rates:
            rounds = [one(broker, rate) for _ in range(args.rounds)]
            row = {"broker": broker, "req_per_s": rate, "rounds": len(rounds),
                   **{k: round(statistics.median(r[k] for r in rounds), 2)
                      for k in ("promote_s", "rollback_s", "prepare_s", "first_new_answer_s",
                                "cold_start_s")},
                   "sent": sum(r["sent"] for r in rounds), "lost": sum(r["lost"] for r in rounds),
                   "errors": sum(r["errors"] for r in rounds),
                   "stale_answers": sum(r["stale_answers"] for r in rounds),
                   "each": rounds}
            rows.append(row)
            print(f"{broker:7} {rate:5.0f} req/s  promote {row['promote_s']:5.2f} s  rollback "
                  f"{row['rollback_s']:5.2f} s  (prepare {row['prepare_s']:.2f} s, first new "
                  f"answer {row['first_new_answer_s']:.2f} s)  cold start {row['cold_start_s']:.2f}"
                  f" s  sent {row['sent']} lost {row['lost']} errors {row['errors']}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "what": "slowest of two workers, median of rounds: command to the worker's serving "
                    "announcement (promote_s, rollback_s), to its first answer from the new "
                    "version, and process start to serving the fetched model (cold_start_s)",
            "command": "python benchmarks/rollout.py " + " ".join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "results": rows}, indent=2) + "\n")
    return 1 if any(r["lost"] or r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
