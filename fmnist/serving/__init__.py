"""Serving: the wire protocol (fmnist.v1 and Open Inference Protocol bodies), the worker's three
parts (``handler`` turns requests into answers, ``pipeline`` moves them through a broker,
``worker`` supervises), the ``serve`` process around them, hot reload and metrics.
"""
