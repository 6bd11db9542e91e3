"""The fuzzed input path for longer than the suite runs it (docs/reliability.md#fuzzed-input-path).

    .venv/bin/python benchmarks/fuzz.py --minutes 10

Runs the properties of ``tests/unit/test_fuzz_inputs.py`` (``TARGETS``, and the handler with the
shipped model loaded, unless ``--no-model``) with hypothesis, round robin in chunks of fresh
random examples, each target for an equal share of the time. Prints, per target, how many
examples ran and what they came to (``ok`` or an error code), and the process's peak RSS before
and after. Exits 1 on the first failing example (hypothesis prints it, shrunk) or when the peak
RSS grew by more than ``RSS_GROWTH_LIMIT``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hypothesis import given, settings  # noqa: E402
from PIL import Image  # noqa: E402

from tests.unit import test_fuzz_inputs as fuzz  # noqa: E402

CHUNK = 200  # examples per hypothesis run; each run draws new random examples


def targets(with_model: bool) -> dict[str, tuple[Any, Callable[[Any], Any]]]:
    found: dict[str, tuple[Any, Callable[[Any], Any]]] = dict(fuzz.TARGETS)
    if with_model:
        from fmnist.model.predictor import Predictor
        from fmnist.serving.handler import PredictionHandler

        started = time.perf_counter()
        handler = PredictionHandler(fuzz.CFG, Predictor.configured(fuzz.CFG, max_batch=8), "fuzz")
        print(f"model loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        found["handler"] = (fuzz.BATCHES, lambda batch: fuzz.check_batch(handler, batch))
    return found


def run_target(strategy: Any, check: Callable[[Any], Any], seconds: float,
               outcomes: Counter[str]) -> int:
    """Examples run within ``seconds`` (whole chunks: the last may overrun a little)."""
    ran = 0

    def counted(value: Any) -> None:
        nonlocal ran
        ran += 1
        result = check(value)
        outcomes.update(result if isinstance(result, list) else [result])

    test = settings(fuzz.FUZZ, max_examples=CHUNK, derandomize=False)(given(strategy)(counted))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        test()
    return ran


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="total time, split over targets")
    ap.add_argument("--only", action="append", default=[], help="a target's name (repeatable)")
    ap.add_argument("--no-model", action="store_true", help="skip the handler with the model")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = ap.parse_args(argv)
    # As in the suite (pytest's filterwarnings = error): Pillow's warning is an error, which
    # imaging answers image_too_large. The handler's warnings (a label that is not 0-9) are
    # expected here; its errors still print.
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    logging.getLogger("fmnist").setLevel(logging.ERROR)

    chosen = targets(with_model=not args.no_model and (not args.only or "handler" in args.only))
    if args.only:
        chosen = {name: chosen[name] for name in args.only}
    share = args.minutes * 60 / len(chosen)
    rss_before = fuzz.peak_rss()
    summary: dict[str, Any] = {"minutes": args.minutes, "targets": {}}
    for name, (strategy, check) in chosen.items():
        outcomes: Counter[str] = Counter()
        started = time.monotonic()
        ran = run_target(strategy, check, share, outcomes)
        elapsed = time.monotonic() - started
        summary["targets"][name] = {"examples": ran, "seconds": round(elapsed, 1),
                                    "outcomes": dict(outcomes.most_common())}
        if not args.json:
            print(f"{name:14} {ran:8,} examples in {elapsed:6.1f} s   "
                  + ", ".join(f"{code} {n:,}" for code, n in outcomes.most_common()))
    growth = fuzz.peak_rss() - rss_before
    summary.update(peak_rss_mib=round(fuzz.peak_rss() / 2**20, 1),
                   peak_rss_growth_mib=round(growth / 2**20, 1),
                   rss_growth_limit_mib=fuzz.RSS_GROWTH_LIMIT // 2**20)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"peak RSS {summary['peak_rss_mib']} MiB, grew {summary['peak_rss_growth_mib']} MiB "
              f"while fuzzing (limit {summary['rss_growth_limit_mib']} MiB)")
    return 0 if growth < fuzz.RSS_GROWTH_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
