"""benchmarks/peers.py's results: the order of systems per round, medians over rounds, fmnist /
peer ratios, the markdown table. Pure functions of the figures, so a unit test covers them."""

from __future__ import annotations

import json
from typing import Any

import report

TITLES = {"fmnist": "fmnist (OIP)", "fmnist-png": "fmnist (PNG)",
          "mlserver": "MLServer, batching off", "mlserver-b64": "MLServer, batching 64 / 2 ms",
          "naive": "naive worker", "echo": "echo (OIP)", "echo-png": "echo (PNG)"}
OURS = ("fmnist", "fmnist-png")
PEERS = ("mlserver", "mlserver-b64", "naive")
# the echo that carries the same request as each of ours (the headline's echo CPU)
ECHO_OF = {"fmnist": "echo", "fmnist-png": "echo-png"}


def title(system: str) -> str:
    """``fmnist@abc123``: fmnist as of commit abc123 (``--baseline``); ``fmnist+x``: with the
    settings of ``--variant x``."""
    name, _, ref = system.partition("@")
    name, _, variant = name.partition("+")
    return TITLES.get(name, name) + (f" at {ref}" if ref else "") + (
        f" with {variant}" if variant else "")


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
    """Each of ours ÷ each peer (and ÷ its own ``--baseline`` build): answers/s (above 1: fmnist
    answers more), CPU per answer and latencies (below 1: fmnist uses less, answers sooner)."""
    out = {}
    for ours in [s for s in OURS if summary.get(s)]:
        others = [p for p in PEERS if summary.get(p)]
        others += [s for s in summary if s.split("@")[0].split("+")[0] == ours and s != ours]
        for peer in others:
            a, b = summary[ours], summary[peer]
            row = {"answers_per_s": ratio(fig(a, "burst", "answered_per_s"),
                                          fig(b, "burst", "answered_per_s")),
                   "cpu_per_answer": ratio(fig(a, "burst", "cpu_ms_per_answer", "server"),
                                           fig(b, "burst", "cpu_ms_per_answer", "server"))}
            for r in rates:
                for q in ("p50_ms", "p99_ms"):
                    row[f"{q}@{r:g}"] = ratio(fig(a, "rates", f"{r:g}", q),
                                              fig(b, "rates", f"{r:g}", q))
            out[f"{ours} ÷ {peer}"] = row
    return out


def headline(summary: dict[str, Any], model_cpu_us: dict[str, float], cores: int
             ) -> dict[str, dict[str, float | None]]:
    """Each of ours' burst answers/s as a share of the run's combined limit: ``cores`` ÷ (the
    model's CPU per image at the batch it served + the echo's CPU per request, worker, broker and
    load generator together). ``model_cpu_us``: CPU µs per image, keyed by our system."""
    out = {}
    for ours, echo in ECHO_OF.items():
        model_us = model_cpu_us.get(ours)
        echo_ms = fig(summary.get(echo) or {}, "burst", "cpu_ms_per_answer")
        answered = fig(summary.get(ours) or {}, "burst", "answered_per_s")
        if not (model_us and echo_ms and answered):
            continue
        echo_us = 1000 * sum(echo_ms.values())
        limit = cores / ((model_us + echo_us) / 1e6)
        out[ours] = {"answers_per_s": round(answered), "served_batch": fig(
                         summary[ours], "burst", "batch_mean"),
                     "model_cpu_us_per_image": model_us, "echo_cpu_us_per_request":
                         round(echo_us, 1), "cores": cores, "limit_per_s": round(limit),
                     "share": round(answered / limit, 3)}
    return out


def fig(figures: dict[str, Any], *path: str) -> Any:
    for key in path:
        figures = figures.get(key) if isinstance(figures, dict) else None
    return figures


def markdown(result: dict[str, Any]) -> str:
    """The medians, a column per system, then each of ours ÷ each peer, then the headline."""
    meta, summary, peers = result["meta"], result["summary"], result["ratios"]
    systems, rates = list(summary), meta["rates"]

    def row(name: str, cells: list[str | None]) -> str:
        return f"| {name} | " + " | ".join("-" if c is None else c for c in cells) + " |"

    def number(value: float | None, form: str) -> str | None:
        return None if value is None else format(value, form)

    def latency(x: dict[str, Any]) -> str | None:
        if x.get("p50_ms") is None:
            return None
        return (f"{x['p50_ms']:.1f} / {x['p99_ms']:.1f}"
                + ("" if x.get("sustained") else " (not sustained)"))

    def burst(*path: str, form: str) -> list[str | None]:
        return [number(fig(summary[s], "burst", *path), form) for s in systems]

    lines = [row("", [title(s) for s in systems]), "|---|" + "---|" * len(systems),
             row(f"burst of {meta['burst']:,}"
                 + (f" (echoes {4 * meta['burst']:,})" if any(s.startswith("echo") for s in systems)
                    else "") + ", answers/s", burst("answered_per_s", form=",.0f")),
             row("burst, steady answers/s (10th to 90th percentile answer)",
                 burst("steady_answered_per_s", form=",.0f"))]
    lines += [row(f"p50 / p99 at {r:g} req/s, ms",
                  [latency(fig(summary[s], "rates", f"{r:g}") or {}) for s in systems])
              for r in rates]
    lines.append(row("CPU per answer in the burst, ms",
                     burst("cpu_ms_per_answer", "server", form=".2f")))
    if any(fig(summary[s], "burst", "thread_us_per_answer") for s in systems):
        lines.append(row("serve loop's thread (its Python) in the burst, µs per answer",
                         burst("thread_us_per_answer", "main", form=".1f")))
        lines.append(row("requests per batch in the burst (mean)",
                         burst("batch_mean", form=".1f")))
    lines.append(row("other processes during the burst, cores",
                     burst("cpu_cores_busy", "other", form=".2f")))
    if peers:
        keys = [("answers_per_s", "answers/s (above 1: fmnist answers more)"),
                ("cpu_per_answer", "CPU per answer (below 1: fmnist uses less)")]
        keys += [(f"{q}@{r:g}", f"{q[:3]} at {r:g} req/s (below 1: fmnist sooner)")
                 for r in rates for q in ("p50_ms", "p99_ms")]
        names = [" ÷ ".join(title(part) for part in p.split(" ÷ ")) for p in peers]
        lines += ["", row("ratio", names), "|---|" + "---|" * len(peers)]
        lines += [row(name, [number(peers[p].get(key), ".2f") for p in peers])
                  for key, name in keys]
    if top := result.get("headline"):
        lines += ["", "| headline | " + " | ".join(title(s) for s in top) + " |",
                  "|---|" + "---|" * len(top)]
        for key, name, form in [
                ("answers_per_s", "burst answers/s", ",.0f"),
                ("served_batch", "served batch (mean requests per batch)", ".1f"),
                ("model_cpu_us_per_image", "model CPU per image at that batch, µs", ".1f"),
                ("echo_cpu_us_per_request", "echo CPU per request (all processes), µs", ".1f"),
                ("limit_per_s", "limit: cores ÷ (model + echo), answers/s", ",.0f"),
                ("share", "share of the limit", ".1%")]:
            lines.append(row(name, [number(top[s].get(key), form) for s in top]))
    return "\n".join(lines)
