"""Training, top to bottom: data, augmentation, model, schedule, fit, test, save.

The input pipeline is numpy (a ``keras.utils.PyDataset``), so nothing here needs TensorFlow and
the same code trains on the JAX backend. Augmentation is a random horizontal flip and a shift of
up to 2 pixels: garments are left-right symmetric and the dataset's objects are centred loosely.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fmnist import data
from fmnist.config import Config, as_dict
from fmnist.data import CLASS_NAMES
from fmnist.errors import ModelError
from fmnist.model import artifacts, calibration
from fmnist.model.network import build, multiply_adds
from fmnist.runtime import device_description, keras_module, library_versions, select_backend


class TrainReporter(Protocol):
    def start(self, device: str, epochs: int, steps: int, summary: str) -> None: ...
    def batch(self, epoch: int, step: int, logs: dict[str, float]) -> None: ...
    def epoch(self, epoch: int, logs: dict[str, float], seconds: float) -> None: ...
    def finish(self) -> None: ...


@dataclass(frozen=True)
class TrainResult:
    weights: Path
    meta: dict[str, Any]
    curve_png: Path


def augment(batch: np.ndarray, rng: np.random.Generator, shift: int = 2) -> np.ndarray:
    """Random horizontal flip and a random shift of up to ``shift`` pixels, per image."""
    n = len(batch)
    flipped = np.where(rng.random(n)[:, None, None] < 0.5, batch[:, :, ::-1], batch)
    padded = np.pad(flipped, ((0, 0), (shift, shift), (shift, shift)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (28, 28), axis=(1, 2))
    dy, dx = rng.integers(0, 2 * shift + 1, n), rng.integers(0, 2 * shift + 1, n)
    return windows[np.arange(n), dy, dx]


def _batches(images: np.ndarray, onehot: np.ndarray, batch_size: int, seed: int, aug: bool) -> Any:
    keras = keras_module()

    class Batches(keras.utils.PyDataset):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.order = self.rng.permutation(len(images))

        def __len__(self) -> int:
            return int(np.ceil(len(images) / batch_size))

        def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
            idx = self.order[i * batch_size:(i + 1) * batch_size]
            x = augment(images[idx], self.rng) if aug else images[idx]
            return x[..., None].astype(np.float32), onehot[idx]

        def on_epoch_end(self) -> None:
            self.order = self.rng.permutation(len(images))

    return Batches()


def _schedule(cfg: Config, steps: int) -> Any:
    keras = keras_module()
    total = cfg.train.epochs * steps
    warmup = min(steps, total // 10)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg.train.learning_rate / 10, decay_steps=total - warmup,
        warmup_target=cfg.train.learning_rate, warmup_steps=warmup, alpha=0.01)


def train(cfg: Config, reporter: TrainReporter) -> TrainResult:
    select_backend("auto", cfg.train.threads, auto="tensorflow")
    keras = keras_module(cfg.train.threads, deterministic=True)
    keras.utils.set_random_seed(cfg.train.seed)
    source = data.locate(cfg.data)
    train_split, test_split = data.load_split("train", source), data.load_split("test", source)
    images, labels = train_split.images, train_split.labels
    order = np.random.default_rng(cfg.train.seed).permutation(len(labels))
    if cfg.train.limit:
        order = order[:cfg.train.limit]
    n_val = int(len(order) * cfg.train.validation_split)
    val_idx, fit_idx = order[:n_val], order[n_val:]
    onehot = np.eye(10, dtype=np.float32)[labels]
    targets = onehot.copy()
    if cfg.train.teacher is not None:  # only the images this run uses (--limit)
        targets[order] = distillation_targets(cfg, images[order], onehot[order])

    model = build(cfg.model)
    batches = _batches(images[fit_idx], targets[fit_idx], cfg.train.batch_size, cfg.train.seed,
                       cfg.train.augment)
    model.compile(
        optimizer=keras.optimizers.AdamW(_schedule(cfg, len(batches)), weight_decay=cfg.train.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.train.label_smoothing),
        metrics=["accuracy"])
    device = device_description(cfg.train.threads)
    reporter.start(device, cfg.train.epochs, len(batches),
                   f"{model.count_params():,} parameters, "
                   f"{multiply_adds(model) / 1e6:.1f} M multiply-adds per image, "
                   f"{len(fit_idx):,} training / {n_val:,} validation images, source: "
                   f"{source.describe()}")
    # Validated against the true labels, through the same numpy batches as training (numpy
    # arrays would go through tf.data, which logs a spurious C++ error on TensorFlow 2.21).
    val_data = (_batches(images[val_idx], onehot[val_idx], 512, cfg.train.seed, aug=False)
                if n_val else None)
    started = time.perf_counter()
    history = model.fit(batches, epochs=cfg.train.epochs, validation_data=val_data, verbose=0,
                        callbacks=[_ReporterCallback(reporter)])
    train_seconds = time.perf_counter() - started
    reporter.finish()

    calibrated = _calibrate(model, images[val_idx], labels[val_idx]) if n_val else \
        {"temperature": 1.0}
    test_probs = calibration.soften(predict_in_batches(model, test_split.images),
                                    calibrated["temperature"])
    test_acc = float(np.mean(np.argmax(test_probs, axis=1) == test_split.labels))
    metrics = {
        "test_accuracy": test_acc,
        "val_accuracy": float(history.history["val_accuracy"][-1]) if n_val else None,
        "train_seconds": round(train_seconds, 1),
        "images_per_second": round(len(fit_idx) * cfg.train.epochs / train_seconds, 1),
        "epochs": cfg.train.epochs,
        "multiply_adds": multiply_adds(model),
        "parameters": int(model.count_params()),
    }
    meta = artifacts.make_meta(
        name=cfg.model.name, config=as_dict(cfg), metrics=metrics, versions=library_versions(),
        dataset={**train_split.sha256, **test_split.sha256}, device=device, calibration=calibrated,
        history={k: [float(v) for v in vs] for k, vs in history.history.items()})
    weights = artifacts.save(model, meta, cfg.weights_path)
    curve = plot_history(history.history, weights.with_suffix(".curve.png"), cfg.model.name)
    return TrainResult(weights, json.loads(artifacts.meta_path(weights).read_text()), curve)


def _calibrate(model: Any, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Temperature scaling on the validation split (see fmnist/model/calibration.py)."""
    probs = predict_in_batches(model, images)
    temperature = calibration.fit_temperature(probs, labels)
    return {"temperature": temperature, "fitted_on": "validation split",
            "val_nll_before": calibration.nll(probs, labels),
            "val_nll_after": calibration.nll(calibration.soften(probs, temperature), labels)}


def predict_in_batches(model: Any, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """Probabilities for uint8 images [N, 28, 28], by direct calls: ``model.predict`` would
    route numpy through tf.data, which logs a spurious C++ error on TensorFlow 2.21."""
    return np.concatenate([
        np.asarray(model(images[i:i + batch, ..., None].astype(np.float32), training=False),
                   np.float32)
        for i in range(0, len(images), batch)])


def distillation_targets(cfg: Config, images: np.ndarray, onehot: np.ndarray) -> np.ndarray:
    """Blend of the labels and the teacher's softened predictions, one row per image.

    The teacher sees each training image once, un-augmented, before training starts: a flip or
    a 2-pixel shift barely moves its prediction, and predicting once costs far less than
    running the teacher on every augmented batch."""
    assert cfg.train.teacher is not None
    if not cfg.train.teacher.is_file():
        raise ModelError(
            f"The teacher to distil from, {cfg.train.teacher} (train.teacher), does not exist.",
            "Train it first with `fmnist train --config configs/train-full.yaml`, or train on the "
            "labels alone with FMNIST_TRAIN__TEACHER= (empty).")
    teacher, _ = artifacts.load_model(cfg.train.teacher)
    soft = calibration.soften(predict_in_batches(teacher, images),
                              cfg.train.distill_temperature)
    weight = cfg.train.distill_weight
    return ((1.0 - weight) * onehot + weight * soft).astype(np.float32)


class _ReporterCallback:
    """Adapts Keras callbacks to our reporter; built lazily so keras stays unimported."""

    def __new__(cls, reporter: TrainReporter) -> Any:
        keras = keras_module()

        class Callback(keras.callbacks.Callback):  # type: ignore[name-defined]
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self.epoch, self.t0 = epoch, time.perf_counter()

            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                reporter.batch(self.epoch, batch + 1, {k: float(v) for k, v in (logs or {}).items()})

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                reporter.epoch(epoch, {k: float(v) for k, v in (logs or {}).items()},
                               time.perf_counter() - self.t0)

        return Callback()


def plot_history(history: dict[str, list[float]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = range(1, len(history["loss"]) + 1)
    for key, ax in (("loss", ax_loss), ("accuracy", ax_acc)):
        ax.plot(epochs, history[key], label=f"train {key}")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], label=f"validation {key}")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{title}: training curve")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["CLASS_NAMES", "TrainResult", "augment", "train"]
