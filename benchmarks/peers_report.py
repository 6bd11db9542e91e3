"""benchmarks/peers.py's results: the order of systems per round, medians over rounds, fmnist /
peer ratios, the markdown table. Pure functions of the figures, so a unit test covers them."""

from __future__ import annotations

import json
from typing import Any

import report

TITLES = {"fmnist": "fmnist (OIP)", "mlserver": "MLServer, batching off",
          "mlserver-b64": "MLServer, batching 64 / 2 ms", "naive": "naive worker"}


def answer_label(value: bytes) -> int | None:
    """The ``label`` output of an OIP answer (every system should say the sneaker's 7)."""
    try:
        outputs = json.loads(value)["outputs"]
        return int(next(o for o in outputs if o["name"] == "label")["data"][0])
    except (ValueError, KeyError, TypeError, IndexError, StopIteration):
        return None


def order(systems: list[str], round_index: int) -> list[str]:
    """Round r starts with the r-th system: drift and position hit every system alike."""
    shift = round_index % len(systems)
    return systems[shift:] + systems[:shift]


def summarize(rounds: dict[str, list[dict[str, Any] | None]]) -> dict[str, Any]:
    """Per system, the median of its rounds, leaf by leaf (failed rounds are None, left out)."""
    out = {}
    for system, per_round in rounds.items():
        ran = [r for r in per_round if r]
        figures = report.aggregate(ran) or {}
        out[system] = {**figures, "rounds": len(ran), "failed_rounds": len(per_round) - len(ran)}
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def ratios(summary: dict[str, Any], rates: list[float]) -> dict[str, dict[str, float | None]]:
    """fmnist ÷ each peer: answers/s (above 1: fmnist answers more), CPU per answer and
    latencies (below 1: fmnist uses less, answers sooner)."""
    ours = summary.get("fmnist")
    if not ours:
        return {}
    out = {}
    for peer, theirs in summary.items():
        if peer == "fmnist" or not theirs:
            continue
        row = {"answers_per_s": ratio(fig(ours, "burst", "answered_per_s"),
                                      fig(theirs, "burst", "answered_per_s")),
               "cpu_per_answer": ratio(fig(ours, "burst", "cpu_ms_per_answer", "server"),
                                       fig(theirs, "burst", "cpu_ms_per_answer", "server"))}
        for r in rates:
            for q in ("p50_ms", "p99_ms"):
                row[f"{q}@{r:g}"] = ratio(fig(ours, "rates", f"{r:g}", q),
                                          fig(theirs, "rates", f"{r:g}", q))
        out[peer] = row
    return out


def fig(figures: dict[str, Any], *path: str) -> Any:
    for key in path:
        figures = figures.get(key) if isinstance(figures, dict) else None
    return figures


def markdown(result: dict[str, Any]) -> str:
    """The medians, a column per system, then fmnist ÷ each peer."""
    meta, summary, peers = result["meta"], result["summary"], result["ratios"]
    systems, rates = list(summary), meta["rates"]

    def row(title: str, cells: list[str | None]) -> str:
        return f"| {title} | " + " | ".join("-" if c is None else c for c in cells) + " |"

    def number(value: float | None, form: str) -> str | None:
        return None if value is None else format(value, form)

    def latency(x: dict[str, Any]) -> str | None:
        if x.get("p50_ms") is None:
            return None
        return (f"{x['p50_ms']:.1f} / {x['p99_ms']:.1f}"
                + ("" if x.get("sustained") else " (not sustained)"))

    lines = [row("", [TITLES.get(s, s) for s in systems]), "|---|" + "---|" * len(systems),
             row(f"burst of {meta['burst']:,}, answers/s",
                 [number(fig(summary[s], "burst", "answered_per_s"), ",.0f") for s in systems]),
             row("burst, steady answers/s (10th to 90th percentile answer)",
                 [number(fig(summary[s], "burst", "steady_answered_per_s"), ",.0f")
                  for s in systems])]
    lines += [row(f"p50 / p99 at {r:g} req/s, ms",
                  [latency(fig(summary[s], "rates", f"{r:g}") or {}) for s in systems])
              for r in rates]
    lines.append(row("CPU per answer in the burst, ms", [
        number(fig(summary[s], "burst", "cpu_ms_per_answer", "server"), ".2f") for s in systems]))
    lines.append(row("other processes during the burst, cores", [
        number(fig(summary[s], "burst", "cpu_cores_busy", "other"), ".2f") for s in systems]))
    if peers:
        keys = [("answers_per_s", "answers/s (above 1: fmnist answers more)"),
                ("cpu_per_answer", "CPU per answer (below 1: fmnist uses less)")]
        keys += [(f"{q}@{r:g}", f"{q[:3]} at {r:g} req/s (below 1: fmnist sooner)")
                 for r in rates for q in ("p50_ms", "p99_ms")]
        lines += ["", row("fmnist ÷ peer", [TITLES.get(p, p) for p in peers]),
                  "|---|" + "---|" * len(peers)]
        lines += [row(title, [number(peers[p].get(key), ".2f") for p in peers])
                  for key, title in keys]
    return "\n".join(lines)
