"""The fuzzed input path for longer than the suite runs it (docs/reliability.md#fuzzed-input-path).

    .venv/bin/python benchmarks/fuzz.py --minutes 10

Runs the properties of ``tests/unit/test_fuzz_inputs.py`` (``TARGETS``, and the handler with the
shipped model loaded, unless ``--no-model``) with hypothesis, round robin in chunks of fresh
random examples, each target for an equal share of the time. Prints, per target, how many
examples ran, what they came to (``ok`` or an error code) and its costliest example: how far
its peak RSS rose above the RSS before it. Then memory in two figures, because a peak is not a
leak: the costliest example against ``REQUEST_PEAK_LIMIT`` (the decoders' bytes a pixel times
``imaging.max_pixels``), and the live RSS (after gc and ``malloc_trim``) at the end against
its value after the first round, against ``LIVE_GROWTH_LIMIT``. Exits 1 on the first failing
example (hypothesis prints it, shrunk) or when either bound is broken.
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

from fmnist import imaging  # noqa: E402
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


class Target:
    """One property under fuzzing: what it ran, what that came to, its costliest example."""

    def __init__(self, name: str, strategy: Any, check: Callable[[Any], Any]) -> None:
        self.name, self.check = name, check
        self.examples, self.seconds = 0, 0.0
        self.outcomes: Counter[str] = Counter()
        self.peak: int | None = None  # bytes above the RSS before the example
        self.costliest = ""
        self.process_peak = 0
        self.test = settings(fuzz.FUZZ, max_examples=CHUNK, derandomize=False)(
            given(strategy)(self._one))

    def _one(self, value: Any) -> None:
        result, peak = fuzz.peak_of(self.check, value)
        self.examples += 1
        self.outcomes.update(result if isinstance(result, list) else [result])
        self.process_peak = max(self.process_peak, fuzz.peak_rss())
        if peak is not None and (self.peak is None or peak > self.peak):
            self.peak, self.costliest = peak, describe(value)

    def chunk(self) -> None:
        started = time.monotonic()
        self.test()
        self.seconds += time.monotonic() - started


def describe(value: Any) -> str:
    """An input in a few words: an image's format and declared size, a batch's largest."""
    if isinstance(value, list):
        biggest = max(value, key=lambda v: _header(v)[2], default=None)
        return f"a batch of {len(value)} with " + (describe(biggest) if value else "nothing")
    fmt, size, _ = _header(value)
    payload = getattr(value, "value", value)
    return f"{fmt} {len(payload):,} B" + (f", header {size[0]}x{size[1]}" if size else "")


def _header(value: Any) -> tuple[str, tuple[int, int] | None, int]:
    """A payload's (or message's) format, the size its header declares and that many pixels."""
    payload = getattr(value, "value", value)
    fmt = imaging.sniff_format(payload) or "other"
    size = imaging._header_size(payload, fmt)  # noqa: SLF001 - the header's claim, no decoding
    return fmt, size, size[0] * size[1] if size else 0


def mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


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
    running = [Target(name, strategy, check) for name, (strategy, check) in chosen.items()]
    share = args.minutes * 60 / len(running)
    live_start = fuzz.live_rss()
    for target in running:  # the first round: what each target allocates once (warm-up)
        target.chunk()
    live_warm = fuzz.live_rss()
    while unfinished := [t for t in running if t.seconds < share]:
        min(unfinished, key=lambda t: t.seconds).chunk()  # the target furthest behind its share
    live_end = fuzz.live_rss()

    peaks = [t.peak for t in running if t.peak is not None]
    peak = max(peaks) if peaks else None
    growth = live_end - live_warm
    summary: dict[str, Any] = {
        "minutes": args.minutes,
        "targets": {t.name: {"examples": t.examples, "seconds": round(t.seconds, 1),
                             "outcomes": dict(t.outcomes.most_common()),
                             "costliest_mib": mib(t.peak), "costliest": t.costliest}
                    for t in running},
        "costliest_example_mib": mib(peak),
        "request_peak_limit_mib": mib(fuzz.REQUEST_PEAK_LIMIT),
        "peak_rss_mib": mib(max(t.process_peak for t in running)),
        "live_rss_mib": {"start": mib(live_start), "after_first_round": mib(live_warm),
                         "end": mib(live_end)},
        "live_rss_growth_mib": mib(growth),
        "live_growth_limit_mib": mib(fuzz.LIVE_GROWTH_LIMIT)}
    if args.json:
        print(json.dumps(summary))
    else:
        for t in running:
            print(f"{t.name:14} {t.examples:8,} examples in {t.seconds:6.1f} s   "
                  + ", ".join(f"{code} {n:,}" for code, n in t.outcomes.most_common()))
            if t.peak is not None:
                print(f"{'':14} costliest: +{mib(t.peak)} MiB, {t.costliest}")
        live = summary["live_rss_mib"]
        print(f"costliest example: +{summary['costliest_example_mib']} MiB over the RSS before it "
              f"(limit {summary['request_peak_limit_mib']} MiB); peak RSS "
              f"{summary['peak_rss_mib']} MiB")
        print(f"live RSS: {live['start']} MiB at the start, {live['after_first_round']} MiB after "
              f"the first round, {live['end']} MiB at the end: grew {summary['live_rss_growth_mib']}"
              f" MiB (limit {summary['live_growth_limit_mib']} MiB)")
    within = (peak is None or peak < fuzz.REQUEST_PEAK_LIMIT) and growth < fuzz.LIVE_GROWTH_LIMIT
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
