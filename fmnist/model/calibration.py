"""Temperature: soften a teacher's probabilities for distillation, or sharpen a student's.

A student distilled from softened targets learns softened probabilities: right in its ranking
(accuracy) but under-confident (a clear sneaker at 0.75). Temperature scaling (Guo et al., 2017)
fixes that without touching the ranking: one number T, fitted after training on the validation
split to minimise its negative log-likelihood, stored in the model's meta and applied by the
predictor to every answer.
"""

from __future__ import annotations

import numpy as np


def soften(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T): T > 1 spreads the probability mass, T < 1 sharpens it."""
    logits = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return (out / out.sum(axis=1, keepdims=True)).astype(np.float32)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0))))


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.1, 3] (on a fine log grid) whose ``soften`` minimises the NLL of ``labels``."""
    grid = np.geomspace(0.1, 3.0, 120)
    losses = [nll(soften(probs, t), labels) for t in grid]
    return float(round(grid[int(np.argmin(losses))], 4))
