"""Test-set evaluation: accuracy, loss, per-class precision/recall/F1, and pictures.

The forward pass is the serving Predictor's, so what we measure is what the worker runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmnist import data
from fmnist.config import Config
from fmnist.data import CLASS_NAMES


@dataclass(frozen=True)
class Evaluation:
    model: str
    version: str
    accuracy: float
    loss: float
    per_class: list[dict[str, Any]]
    confusion: list[list[int]]
    confusion_png: Path
    errors_png: Path

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def per_class_scores(labels: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
    n = len(CLASS_NAMES)
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    rows = []
    for i, name in enumerate(CLASS_NAMES):
        tp = confusion[i, i]
        precision = tp / max(confusion[:, i].sum(), 1)
        recall = tp / max(confusion[i, :].sum(), 1)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        rows.append({"label": i, "class_name": name, "precision": round(float(precision), 4),
                     "recall": round(float(recall), 4), "f1": round(float(f1), 4),
                     "support": int(confusion[i, :].sum())})
    return confusion, rows


def evaluate(cfg: Config, out_dir: Path | None = None) -> Evaluation:
    from fmnist.model.predictor import Predictor

    test = data.load_split("test", data.locate(cfg.data))
    predictor = Predictor.configured(cfg, max_batch=512)
    probs = predictor.probabilities(test.images)
    predicted = probs.argmax(axis=1)
    picked = probs[np.arange(len(probs)), test.labels]
    loss = float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))
    confusion, rows = per_class_scores(test.labels, predicted)
    out_dir = out_dir or cfg.model.weights_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = cfg.model.name
    return Evaluation(
        model=predictor.name, version=predictor.version,
        accuracy=float(np.mean(predicted == test.labels)), loss=loss, per_class=rows,
        confusion=confusion.tolist(),
        confusion_png=plot_confusion(confusion, out_dir / f"{stem}.confusion.png", stem),
        errors_png=plot_worst_errors(test.images, test.labels, probs,
                                     out_dir / f"{stem}.errors.png", stem))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(confusion: np.ndarray, path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(confusion, cmap="Blues")
    ticks = range(len(CLASS_NAMES))
    ax.set_xticks(ticks, CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(ticks, CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = confusion.max() / 2
    for i in ticks:
        for j in ticks:
            ax.text(j, i, confusion[i, j], ha="center", va="center", fontsize=8,
                    color="white" if confusion[i, j] > threshold else "black")
    ax.set_title(f"{title}: confusion matrix on the 10k test images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_worst_errors(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, path: Path,
                      title: str, count: int = 24) -> Path:
    """The misclassified test images the model was most confident about."""
    plt = _pyplot()
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-probs[wrong, predicted[wrong]])][:count]
    cols = 6
    rows = max(1, int(np.ceil(len(worst) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.2))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, i in zip(np.atleast_1d(axes).ravel(), worst, strict=False):
        ax.imshow(images[i], cmap="gray")
        ax.set_title(f"true {CLASS_NAMES[labels[i]]}\npred {CLASS_NAMES[predicted[i]]} "
                     f"{probs[i, predicted[i]]:.0%}", fontsize=7)
    fig.suptitle(f"{title}: most confident mistakes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
