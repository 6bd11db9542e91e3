"""Where the worker's CPU goes: a summary of a py-spy `record --format raw` file.

Each sample is one on-CPU stack of one Python thread (py-spy leaves idle threads out, and
native threads such as librdkafka's and XLA's are not sampled at all). A sample is
charged to the innermost *stage* on its stack (decode, inference, response JSON, Kafka send,
...) so the stages add up to 100%, and the leaf functions are ranked by self time.

    python benchmarks/cpu_profile.py PROFILE.txt [--top 15]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# (stage, regex on one frame "function (file:line)"); the innermost frame that matches wins.
STAGES = [
    ("image decode (imaging.decode_many, the PNG fast path, Pillow)", r"\(fmnist/imaging/"),
    ("OIP bodies (parse the tensor, build the answer)", r"\(fmnist/serving/oip\.py"),
    ("request header parsing", r"^parse_request \("),
    ("inference (dispatching the compiled forward pass, collecting its results)",
     r"^Predictor\.(probabilities|start)|^compile_forward|tensorflow/|jax/"),
    ("top-k + response JSON", r"^Predictor\.describe|^rank_many|^response \(fmnist/serving/"
                              r"protocol|^dead_letter|^PredictionHandler\._answers"),
    ("crash journal (serve.journal_dir)", r"\(fmnist/serving/crashes\.py"),
    ("publish: send (serialise, queue)", r"^KafkaTopicProducer\.send|^PublisherClient\.publish"),
    ("publish: wait for confirmation", r"^KafkaConfirmation\.wait|^Future\.result|"
                                       r"^KafkaTopicProducer\.publish|^PubsubProducer\.publish"),
    ("commit / ack", r"^KafkaTopicConsumer\.(commit|_commit)|^PubsubConsumer\.commit|"
                     r"^PubsubConsumer\._settle"),
    ("consume: poll, fetch, decode records", r"^KafkaTopicConsumer\.(next_batch|_message)|"
                                             r"^PubsubConsumer\.next_batch"),
    ("Pub/Sub client threads (gRPC stream, leases, callbacks)", r"google/|grpc/"),
    ("metrics and stats (per batch)", r"fmnist/serving/metrics|prometheus|^Stats\."),
    ("worker loop (assembling batches and answers)", r"^Worker\.|^Pipeline\.|"
                                                     r"^PredictionHandler\."),
]
_COMPILED = [(name, re.compile(rx)) for name, rx in STAGES]


def read(path: Path) -> list[tuple[list[str], int]]:
    samples = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples.append((stack.split(";"), int(count)))
    return samples


def stage(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, rx in _COMPILED:
            if rx.search(frame):
                return name
    return "other (threads and code outside the stages)"


def summarize(paths: list[Path], top: int = 15) -> dict[str, Any]:
    """One summary over one or more profiles (several runs' samples are pooled)."""
    samples = [s for path in paths if path.exists() for s in read(path)]
    total = sum(c for _, c in samples) or 1
    stages: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for frames, count in samples:
        stages[stage(frames)] += count
        leaves[re.sub(r":\d+\)$", ")", frames[-1])] += count
    return {"samples": total,
            "stages": {k: round(100 * v / total, 1) for k, v in stages.most_common()},
            "top_self": {k: round(100 * v / total, 1) for k, v in leaves.most_common(top)}}


def text(summary: dict[str, Any]) -> str:
    lines = [f"{summary['samples']} on-CPU samples", "", "| stage | % of worker CPU |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["stages"].items()]
    lines += ["", "| leaf function (self time) | % |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in summary["top_self"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profiles", type=Path, nargs="+")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    summary = summarize(args.profiles, args.top)
    print(json.dumps(summary, indent=1) if args.json else text(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
