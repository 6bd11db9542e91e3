"""Before/after: one markdown row per (result file, configuration), for tuning decisions.

    python benchmarks/compare.py \
        b64=benchmarks/results/tuning/2026-11-29-batching/20261129T131743Z-b64.json \
        b256=benchmarks/results/tuning/2026-11-29-batching/20261129T132025Z-b256.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from report import rate


def rows(label: str, result: dict, rates: list[float]) -> list[str]:
    out = []
    for name, c in result["configs"].items():
        if not c:
            out.append(f"| {label} | {name} | failed |" + " |" * (len(rates) + 2))
            continue
        sat = c.get("saturation") or {}
        cpu = sat.get("cpu_ms_per_request") or {}
        cells = []
        for r in rates:
            x = rate(c, r)
            cells.append("-" if x.get("p50_ms") is None else
                         f"{x['p50_ms']:.1f} / {x['p99_ms']:.1f}" + ("" if x.get("sustained") else " ns"))
        out.append(f"| {label} | {name} | {sat.get('answered_per_s', 0):,.0f} | "
                   f"{cpu.get('worker', 0):.2f} / {cpu.get('broker', 0):.2f} / "
                   f"{cpu.get('loadgen', 0):.2f} | " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", metavar="LABEL=FILE")
    args = ap.parse_args(argv)
    loaded = []
    for item in args.results:
        label, _, path = item.rpartition("=")
        loaded.append((label or Path(path).stem, json.loads(Path(path).read_text())))
    rates = sorted({r for _, res in loaded for r in res["meta"]["rates"]})
    print("| variant | configuration | saturation answered/s | CPU ms/request worker / broker / "
          "load gen | " + " | ".join(f"{r:g}/s p50 / p99 ms" for r in rates) + " |")
    print("|---|---|---|---|" + "---|" * len(rates))
    for label, res in loaded:
        print("\n".join(rows(label, res, rates)))
    print("\n(ns: not sustained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
