"""The harness that the tests, the benchmarks and ``scripts/faults`` share: per-run topics,
worker processes, bounded waiting and the fault scenarios. Nothing in the product imports it.
"""
