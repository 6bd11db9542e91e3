"""Medians over runs, the targets with PASS/FAIL, the markdown table and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import median_of

SHARED_CORES_NOTE = ("broker, load generator and worker(s) share the machine's {nproc} cores; "
                     "every figure is the median of {runs} run(s)")


def aggregate(runs: list[Any]) -> Any:
    """Median, leaf by leaf, of runs with the same shape (dicts by key, lists by position)."""
    runs = [r for r in runs if r is not None]
    if not runs:
        return None
    first = runs[0]
    if isinstance(first, dict):
        keys = dict.fromkeys(k for r in runs if isinstance(r, dict) for k in r)
        return {k: aggregate([r.get(k) for r in runs if isinstance(r, dict)]) for k in keys}
    if isinstance(first, list):
        return [aggregate([r[i] for r in runs if isinstance(r, list) and len(r) > i])
                for i in range(max(len(r) for r in runs))]
    if isinstance(first, (int, float, bool)):
        return median_of(runs)
    return first


def config_name(broker: str, kind: str, workers: int) -> str:
    return f"{broker}/{kind}/{workers}w"


def find(configs: dict[str, Any], broker: str, kind: str, workers: int = 1) -> dict[str, Any]:
    return configs.get(config_name(broker, kind, workers)) or {}


def rate(cfg: dict[str, Any], offered: float) -> dict[str, Any]:
    return next((r for r in cfg.get("rates") or [] if r and r.get("offered_per_s") == offered), {})


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on the medians; a figure that is missing is a FAIL."""
    configs = result["configs"]
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: str, ok: bool | None, note: str = "") -> None:
        out.append({"target": name, "value": value, "limit": limit,
                    "pass": bool(ok) if value is not None else False, "note": note})

    for broker, aim in (("kafka", 0.5), ("pubsub", 0.5)):
        e2e = (find(configs, broker, "fmnist").get("saturation") or {}).get("answered_per_s")
        echo = (find(configs, broker, "echo").get("saturation") or {}).get("answered_per_s")
        if e2e is None and echo is None:
            continue
        ratio = e2e / echo if e2e and echo else None
        add(f"{broker} e2e saturation throughput / echo ceiling", ratio, f">= {aim:.0%}",
            ratio is not None and ratio >= aim,
            f"{e2e or 0:.0f} vs {echo or 0:.0f} answered/s" + (" (aim 70%)" if broker == "kafka" else ""))
    kf, ke = rate(find(configs, "kafka", "fmnist"), 200), rate(find(configs, "kafka", "echo"), 200)
    if kf or ke:
        p50, e50 = kf.get("p50_ms"), ke.get("p50_ms")
        gap = p50 - e50 if p50 is not None and e50 is not None else None
        add("kafka p50 at 200 req/s - echo p50", gap, "<= 5 ms", gap is not None and gap <= 5,
            f"{p50} ms vs echo {e50} ms")
        p99 = kf.get("p99_ms")
        add("kafka p99 at 200 req/s", p99, "<= 50 ms", p99 is not None and p99 <= 50)
    fmnist = [c for c in configs.values() if c and c.get("kind") == "fmnist"]
    colds = [c["cold_start_s"] for c in fmnist if c.get("cold_start_s") is not None]
    if fmnist:
        worst = max(colds) if colds else None
        add("worker cold start (process start -> first answer)", worst, "<= 10 s",
            worst is not None and worst <= 10, "worst broker, median of runs")
        rss = [c["rss_peak_mb"] for c in fmnist if c.get("rss_peak_mb") is not None]
        peak = max(rss) if rss else None
        add("worker peak RSS (VmHWM) under load", peak, "<= 1024 MB",
            peak is not None and peak <= 1024)
        loads = [c.get("model_loads_per_process") for c in fmnist]
        children = [c.get("child_processes") for c in fmnist]
        clean = all(v == 1 for v in loads) and all(v == 0 for v in children)
        add("no per-request model loading or process spawning", 1.0 if clean else 0.0,
            "1 load per process, 0 children", clean,
            "model loaded once per worker (log), no child processes after the load")
    return out


def markdown(result: dict[str, Any]) -> str:
    meta, configs = result["meta"], result["configs"]
    m = meta["machine"]
    lines = [f"Run {meta['timestamp']} on {m['nproc']} x {m['cpu_model']}, {m['memory_gb']} GB; "
             + SHARED_CORES_NOTE.format(nproc=m["nproc"], runs=meta["runs"]) + "."]
    if meta.get("training_running"):
        lines.append("\n**`fmnist train` was running during this run: the figures are not valid.**")
    if meta.get("smoke"):
        lines.append("\n*Smoke run (tiny counts, 1 run): checks the script works; not figures.*")
    if libs := meta.get("libraries"):
        lines.append("\nLibraries: " + ", ".join(f"{k} {v}" for k, v in libs.items()))
    if overrides := meta.get("overrides"):
        lines.append("\nConfig overrides: " + ", ".join(f"`{k}={v}`" for k, v in overrides.items()))
    model = result.get("model") or {}
    for label, mres in model.items():
        ips = mres.get("images_per_s") or {}
        lat = mres.get("single_image") or {}
        if label.isdigit():  # results written before the backend was part of the key
            label = f"{label} thread(s)"
        lines += ["", f"**Model only** ({label}, `Predictor.probabilities`):", "",
                  "| batch | " + " | ".join(ips) + " | 1-image p50 | 1-image p99 |",
                  "|---|" + "---|" * (len(ips) + 2),
                  "| images/s | " + " | ".join(f"{v:,.0f}" for v in ips.values())
                  + f" | {lat.get('p50_ms', 0):.2f} ms | {lat.get('p99_ms', 0):.2f} ms |"]
    if model:
        costs = next(iter(model.values())).get("per_request_us") or {}
        lines += ["", "Per-request CPU outside the forward pass (µs): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in costs.items())]
    rates = meta["rates"]
    lines += ["", "| configuration | saturation answered/s | vs echo | "
              + " | ".join(f"{r:g}/s p50 / p95 / p99 ms" for r in rates)
              + " | cold start s | peak RSS MB |",
              "|---|---|---|" + "---|" * len(rates) + "---|---|"]
    for name, c in configs.items():
        if not c:
            lines.append(f"| {name} | failed | | " + " | " * len(rates) + " |")
            continue
        sat = (c.get("saturation") or {}).get("answered_per_s")
        echo = (find(configs, c["broker"], "echo", c["workers"]).get("saturation") or {}) \
            .get("answered_per_s")
        vs = f"{sat / echo:.1%}" if sat and echo and c["kind"] != "echo" else ""
        cells = []
        for r in rates:
            x = rate(c, r)
            cell = (f"{x['p50_ms']:.1f} / {x['p95_ms']:.1f} / {x['p99_ms']:.1f}"
                    if x.get("p50_ms") is not None else "-")
            if x and not x.get("sustained"):
                cell += " (not sustained)"
            if x.get("loadgen_limited"):
                cell += " (load generator behind)"
            cells.append(cell)
        other = ((c.get("saturation") or {}).get("cpu_cores_busy") or {}).get("other")
        if other is not None and other > 0.2:
            name += f" (other processes used {other:.1f} cores)"
        cold, rss = c.get("cold_start_s"), c.get("rss_peak_mb")
        lines.append(f"| {name} | {sat or 0:,.0f} | {vs} | " + " | ".join(cells)
                     + f" | {'' if cold is None else f'{cold:.1f}'} | "
                     f"{'' if rss is None else f'{rss:.0f}'} |")
    if prof := result.get("profile"):
        from cpu_profile import text

        lines += ["", "**Where the first fmnist worker's CPU went** (py-spy, measured phases):", "",
                  text(prof)]
    lines += ["", "| target | value | limit | result |", "|---|---|---|---|"]
    for t in result["targets"]:
        value = "-" if t["value"] is None else (f"{t['value']:.1%}" if "ceiling" in t["target"]
                                                else f"{t['value']:.2f}")
        lines.append(f"| {t['target']} | {value} | {t['limit']} | "
                     f"{'PASS' if t['pass'] else 'FAIL'} {t['note']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Latency p50 (solid) and p99 (dashed) against achieved throughput, one colour per
    configuration; the dotted vertical line is its saturation throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, c) in enumerate(result["configs"].items()):
        if not c:
            continue
        colour = colours[i % len(colours)]
        points = [r for r in c.get("rates") or [] if r and r.get("p50_ms") is not None]
        xs = [r["achieved_per_s"] for r in points]
        ax.plot(xs, [r["p50_ms"] for r in points], "o-", color=colour, label=f"{name} p50")
        ax.plot(xs, [r["p99_ms"] for r in points], "^--", color=colour, label=f"{name} p99")
        for r in points:
            if not r.get("sustained"):
                ax.annotate("not sustained", (r["achieved_per_s"], r["p99_ms"]), fontsize=7,
                            color=colour)
        if sat := (c.get("saturation") or {}).get("answered_per_s"):
            ax.axvline(sat, color=colour, linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("achieved throughput (answers/s); dotted: saturation throughput")
    ax.set_ylabel("latency, scheduled send -> answer received (ms)")
    m = result["meta"]["machine"]
    ax.set_title(f"fmnist vs echo ceiling: {m['nproc']} shared cores ({m['cpu_model']}), "
                 f"median of {result['meta']['runs']} run(s)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Re-render a result's markdown and plot: python benchmarks/report.py RESULT.json"""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("result", type=Path)
    args = ap.parse_args(argv)
    result = json.loads(args.result.read_text())
    args.result.with_suffix(".md").write_text(markdown(result))
    if result["configs"]:
        plot(result, args.result.with_suffix(".png"))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
