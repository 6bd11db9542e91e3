"""How long reading the jobs' history takes, and whether two readers at once each see all of it.

    .venv/bin/python benchmarks/job_history.py [--events 2000] [--rounds 3] [--out FILE.json]

Publishes N job events to a fresh events topic on each broker, then times
``fmnist.jobs.history.read`` alone and with a second reader at the same moment (two threads),
``rounds`` times each; prints medians and how many events each concurrent reader saw.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

from fmnist import config
from fmnist.brokers import connect
from fmnist.jobs import history
from fmnist.jobs.protocol import event, event_message


def measure(name: str, events: int, rounds: int) -> dict[str, object]:
    b = connect(name, config.load())
    topic = f"bench-jobhistory-{uuid.uuid4().hex[:8]}"
    try:
        b.ensure_topics([topic])
        producer = b.producer()
        producer.publish([event_message(topic, event(f"job-{i % 20}", "progress", seq=i))
                          for i in range(events)], timeout_s=60)
        producer.close()
        alone, alone_seen, pair, pair_seen = [], [], [], []
        for _ in range(rounds):
            started = time.perf_counter()
            alone_seen.append(len(history.read(b, topic)))
            alone.append(time.perf_counter() - started)
        for _ in range(rounds):
            out: dict[int, tuple[int, float]] = {}

            def read(k: int, out: dict[int, tuple[int, float]] = out) -> None:
                t0 = time.perf_counter()
                out[k] = (len(history.read(b, topic)), time.perf_counter() - t0)

            threads = [threading.Thread(target=read, args=(k,)) for k in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            pair.append(max(s for _, s in out.values()))
            pair_seen.extend(n for n, _ in out.values())
        return {"broker": name, "events": events, "alone_s": round(statistics.median(alone), 2),
                "alone_seen": alone_seen, "two_readers_s": round(statistics.median(pair), 2),
                "two_readers_seen": pair_seen}
    finally:
        b.delete_topics([topic])
        b.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = [measure(name, args.events, args.rounds) for name in ("kafka", "pubsub")]
    for r in results:
        print(f"{r['broker']}: {r['events']} events; alone {r['alone_s']} s (saw "
              f"{r['alone_seen']}); two readers at once {r['two_readers_s']} s (each saw "
              f"{r['two_readers_seen']})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": {"command": " ".join(sys.argv)},
                                        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
