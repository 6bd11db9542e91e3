"""benchmarks/peers_report.py, the results of benchmarks/peers_report.py: the order of systems per
round, medians over rounds, fmnist / peer ratios, the table and reading an answer's label. No
broker, no MLServer."""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

from fmnist.testing.processes import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark scripts import each other flat
peers_report = importlib.import_module("peers_report")


def one_round(answers_per_s: float, cpu_ms: float, p50: float, p99: float,
              sustained: bool = True) -> dict[str, Any]:
    rate = {"offered_per_s": 200.0, "p50_ms": p50, "p99_ms": p99, "sustained": sustained}
    return {"burst": {"answered_per_s": answers_per_s,
                      "cpu_ms_per_answer": {"server": cpu_ms, "broker": 0.1}},
            "rates": {"200": rate}}


def test_each_round_starts_with_the_next_system() -> None:
    systems = ["fmnist", "mlserver", "naive"]
    assert [peers_report.order(systems, r) for r in range(4)] == [
        ["fmnist", "mlserver", "naive"], ["mlserver", "naive", "fmnist"],
        ["naive", "fmnist", "mlserver"], ["fmnist", "mlserver", "naive"]]


def test_summary_is_the_median_of_the_rounds_that_ran() -> None:
    rounds = {"fmnist": [one_round(3000, 0.4, 7, 10), None, one_round(3600, 0.5, 8, 12),
                         one_round(3400, 0.3, 6, 11)],
              "naive": [one_round(200, 3.6, 900, 1500, sustained=False),
                        one_round(180, 3.8, 40, 90), one_round(210, 3.4, 50, 70)]}
    summary = peers_report.summarize(rounds)
    assert summary["fmnist"]["burst"]["answered_per_s"] == 3400
    assert summary["fmnist"]["burst"]["cpu_ms_per_answer"]["server"] == 0.4
    assert (summary["fmnist"]["rounds"], summary["fmnist"]["failed_rounds"]) == (3, 1)
    assert summary["naive"]["rates"]["200"]["p50_ms"] == 50
    assert summary["naive"]["rates"]["200"]["sustained"] is True  # by majority


def test_ratios_are_fmnist_over_each_peer() -> None:
    summary = peers_report.summarize({"fmnist": [one_round(3000, 0.4, 7, 10)],
                               "mlserver": [one_round(600, 1.6, 5, 20)]})
    assert peers_report.ratios(summary, [200.0]) == {"fmnist ÷ mlserver": {
        "answers_per_s": 5.0, "cpu_per_answer": 0.25, "p50_ms@200": 1.4, "p99_ms@200": 0.5}}
    assert peers_report.ratios({"mlserver": summary["mlserver"]}, [200.0]) == {}  # no fmnist, none


def test_ratios_compare_a_build_with_its_baseline_not_with_another_request() -> None:
    summary = peers_report.summarize({
        "fmnist-png": [one_round(4000, 0.3, 5, 8)], "fmnist-png@abc123": [one_round(2000, 0.4, 10, 16)],
        "fmnist@abc123": [one_round(1000, 0.5, 5, 8)], "echo": [one_round(9000, 0.1, 3, 4)]})
    assert list(peers_report.ratios(summary, [200.0])) == ["fmnist-png ÷ fmnist-png@abc123"]
    assert peers_report.ratios(summary, [200.0])["fmnist-png ÷ fmnist-png@abc123"][
        "answers_per_s"] == 2.0
    assert peers_report.title("fmnist-png@abc123") == "fmnist (PNG) at abc123"


def test_headline_is_the_share_of_cores_over_model_plus_echo_cpu() -> None:
    ours = one_round(2400, 0.35, 5, 8)
    ours["burst"]["batch_mean"] = 180.0
    echo = one_round(15000, 0.0, 3, 4)
    echo["burst"]["cpu_ms_per_answer"] = {"server": 0.03, "broker": 0.03, "loadgen": 0.04}
    summary = peers_report.summarize({"fmnist": [ours], "echo": [echo]})
    top = peers_report.headline(summary, {"fmnist": 300.0}, cores=2)
    # 2 cores / (300 + 100 µs) = 5,000 a second; 2,400 is 48 % of it
    assert top == {"fmnist": {"answers_per_s": 2400, "served_batch": 180.0,
                              "model_cpu_us_per_image": 300.0, "echo_cpu_us_per_request": 100.0,
                              "cores": 2, "limit_per_s": 5000, "share": 0.48}}
    assert peers_report.headline(summary, {}, cores=2) == {}  # no model figure, no headline
    text = peers_report.markdown({"meta": {"burst": 5000, "rates": []}, "summary": summary,
                                  "ratios": {}, "headline": top})
    assert "| share of the limit | 48.0% |" in text


def test_table_has_a_column_per_system_and_a_ratio_table() -> None:
    summary = peers_report.summarize({"fmnist": [one_round(3435, 0.39, 7.0, 11.8)],
                               "naive": [one_round(205, 3.6, 900, 1500, sustained=False)]})
    result = {"meta": {"burst": 5000, "rates": [200.0]}, "summary": summary,
              "ratios": peers_report.ratios(summary, [200.0])}
    text = peers_report.markdown(result)
    assert "|  | fmnist (OIP) | naive worker |" in text
    assert "| burst of 5,000, answers/s | 3,435 | 205 |" in text
    assert ("| p50 / p99 at 200 req/s, ms | 7.0 / 11.8 | 900.0 / 1500.0 (not sustained) |"
            in text)
    assert "| CPU per answer in the burst, ms | 0.39 | 3.60 |" in text
    assert "| answers/s (above 1: fmnist answers more) | 16.76 |" in text
    assert "| ratio | fmnist (OIP) ÷ naive worker |" in text


def test_answer_label_reads_an_oip_answer() -> None:
    answer = {"outputs": [{"name": "probabilities", "data": [0.1] * 10},
                          {"name": "label", "shape": [1], "data": [7]}]}
    assert peers_report.answer_label(json.dumps(answer).encode()) == 7
    assert peers_report.answer_label(b'{"error": "invalid_request: ..."}') is None
    assert peers_report.answer_label(b"not json") is None
