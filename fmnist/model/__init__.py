"""The model: its network, training, evaluation, calibration, saved artifacts and the
predictor that every inference path (``predict``, ``evaluate``, the serving worker) shares.

Nothing here depends on brokers or serving; arrows point into this package, never out of it.
"""
