"""Training, top to bottom: data, augmentation, model, schedule, fit, test, save.

The input pipeline is numpy (a ``keras.utils.PyDataset``), so nothing here needs TensorFlow and
the same code trains on the JAX backend. Augmentation is a random horizontal flip and a shift of
up to 2 pixels: garments are left-right symmetric and the dataset's objects are centred loosely.

With ``train.with_feedback`` the labelled images users sent back (fmnist/feedback.py, read from
``serve.broker``) join the images the model is fitted on, never the validation or test images,
so that the accuracy figures stay comparable between models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fmnist import data
from fmnist.config import Config, as_dict
from fmnist.data import CLASS_NAMES
from fmnist.errors import Cancelled, Interrupted, ModelError
from fmnist.model import artifacts, calibration
from fmnist.model.network import build, multiply_adds
from fmnist.runtime import device_description, keras_module, library_versions, select_backend

log = logging.getLogger("fmnist.model.train")


class TrainReporter(Protocol):
    def start(self, device: str, epochs: int, steps: int, summary: str,
              initial_epoch: int = 0) -> None: ...
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


# Asked once per batch; "cancelled" or "interrupted" stops training at the end of that batch.
StopCheck = Callable[[], str | None]


def train(cfg: Config, reporter: TrainReporter, checkpoint_dir: Path | None = None,
          stop: StopCheck | None = None, extra: data.ExtraImages | None = None) -> TrainResult:
    """Train, test, calibrate and save ``cfg.weights_path``.

    ``checkpoint_dir``: the model (with its optimizer state) and the history are saved there
    after every epoch, and a run that finds a checkpoint of the same settings there goes on
    from its last completed epoch (a job redelivered after its worker died). ``stop``: see
    ``StopCheck``; a stopped run raises ``Cancelled`` or ``Interrupted`` and keeps its
    checkpoint. ``extra``: labelled images added to the fit set (``train.with_feedback``: the
    caller reads them with ``fmnist.feedback.training_set``, so this module needs no broker).
    """
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
    fit_images, fit_targets = images[fit_idx], targets[fit_idx]
    if extra is not None and len(extra.labels):  # what users labelled: their word, no teacher
        fit_images = np.concatenate([fit_images, extra.images])
        fit_targets = np.concatenate([fit_targets, np.eye(10, dtype=np.float32)[extra.labels]])

    checkpoint = Checkpoint(checkpoint_dir, cfg) if checkpoint_dir else None
    resumed = checkpoint.load() if checkpoint else None
    initial_epoch = resumed.epochs_done if resumed else 0
    # A resumed run shuffles with another seed: the epochs it has left see new orders.
    batches = _batches(fit_images, fit_targets, cfg.train.batch_size,
                       cfg.train.seed + initial_epoch, cfg.train.augment)
    if resumed:
        model = resumed.model
    else:
        model = build(cfg.model)
        model.compile(
            optimizer=keras.optimizers.AdamW(_schedule(cfg, len(batches)),
                                             weight_decay=cfg.train.weight_decay),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.train.label_smoothing),
            metrics=["accuracy"])
    device = device_description(cfg.train.threads)
    reporter.start(device, cfg.train.epochs, len(batches),
                   f"{model.count_params():,} parameters, "
                   f"{multiply_adds(model) / 1e6:.1f} M multiply-adds per image, "
                   f"{len(fit_images):,} training / {n_val:,} validation images, source: "
                   f"{source.describe()}{_feedback_summary(extra)}", initial_epoch)
    # Validated against the true labels, through the same numpy batches as training (numpy
    # arrays would go through tf.data, which logs a spurious C++ error on TensorFlow 2.21).
    val_data = (_batches(images[val_idx], onehot[val_idx], 512, cfg.train.seed, aug=False)
                if n_val else None)
    started = time.perf_counter()
    stopped: list[str] = []  # the reason, once ``stop`` has asked for it
    callbacks = [_ReporterCallback(reporter, stop, stopped)]
    if checkpoint:
        callbacks.append(_CheckpointCallback(checkpoint, resumed.history if resumed else {},
                                             stopped))
    fitted = model.fit(batches, epochs=cfg.train.epochs, initial_epoch=initial_epoch,
                       validation_data=val_data, verbose=0, callbacks=callbacks)
    train_seconds = time.perf_counter() - started + (resumed.seconds if resumed else 0.0)
    reporter.finish()
    if stopped:
        raise (Cancelled if stopped[0] == "cancelled" else Interrupted)(
            f"Training stopped ({stopped[0]}) during epoch {_epoch_of(fitted) + 1}.")
    history = _merged(resumed.history if resumed else {}, fitted.history)
    bn_images = reestimate_batchnorm(model, fit_images)

    calibrated = _calibrate(model, images[val_idx], labels[val_idx]) if n_val else \
        {"temperature": 1.0}
    test_probs = calibration.soften(predict_in_batches(model, test_split.images),
                                    calibrated["temperature"])
    test_acc = float(np.mean(np.argmax(test_probs, axis=1) == test_split.labels))
    metrics = {
        "test_accuracy": test_acc,
        # measured with the final BatchNorm statistics, like the test accuracy; the history's
        # last val_accuracy used the moving averages of training
        "val_accuracy": calibrated.get("val_accuracy"),
        "train_seconds": round(train_seconds, 1),
        "images_per_second": round(len(fit_images) * cfg.train.epochs / train_seconds, 1),
        "epochs": cfg.train.epochs,
        "multiply_adds": multiply_adds(model),
        "parameters": int(model.count_params()),
        "batchnorm_reestimated_on": bn_images,
    }
    lineage: dict[str, Any] = {}
    if extra is not None:
        metrics["feedback_images"] = len(extra.labels)
        lineage["feedback"] = extra.source
    meta = artifacts.make_meta(
        name=cfg.model.name, config=as_dict(cfg), metrics=metrics, versions=library_versions(),
        dataset={**train_split.sha256, **test_split.sha256}, device=device, calibration=calibrated,
        history=history, **lineage)
    weights = artifacts.save(model, meta, cfg.weights_path)
    curve = plot_history(history, weights.with_suffix(".curve.png"), cfg.model.name)
    return TrainResult(weights, json.loads(artifacts.meta_path(weights).read_text()), curve)


def _feedback_summary(extra: data.ExtraImages | None) -> str:
    if extra is None:
        return ""
    where = f"{extra.source.get('topic')} ({extra.source.get('broker')})"
    if not len(extra.labels):
        return f"; no labelled images on {where}: the dataset alone"
    return f" + {len(extra.labels):,} labelled images from {where}"


def reestimate_batchnorm(model: Any, images: np.ndarray, batch: int = 250,
                         max_images: int = 10_000) -> int:
    """Set every BatchNormalization layer's moving mean and variance to the average of its
    batch statistics over (up to) ``max_images`` training images, under the final weights.

    The moving averages (momentum 0.99) forget their zero/one start only after a few hundred
    steps and always lag the weights: after 2 epochs on 3,000 images they put test accuracy
    at chance (0.10) while the batches scored 0.71 (docs/decisions.md#batchnorm-reestimation).
    Returns how many images were used.
    """
    keras = keras_module()
    layers = [layer for layer in model.layers
              if isinstance(layer, keras.layers.BatchNormalization)]
    used = images[:max_images]
    if not layers or not len(used):
        return 0
    momenta = [layer.momentum for layer in layers]
    try:
        for i, start in enumerate(range(0, len(used), batch)):
            for layer in layers:  # moving = (i * moving + batch) / (i + 1): a running mean
                layer.momentum = i / (i + 1)
            model(used[start:start + batch, ..., None].astype(np.float32), training=True)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    return len(used)


def _calibrate(model: Any, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Temperature scaling on the validation split (see fmnist/model/calibration.py)."""
    probs = predict_in_batches(model, images)
    temperature = calibration.fit_temperature(probs, labels)
    accuracy = float(np.mean(np.argmax(probs, axis=1) == labels))
    return {"temperature": temperature, "fitted_on": "validation split", "val_accuracy": accuracy,
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


def _merged(past: dict[str, list[float]], new: dict[str, list[Any]]) -> dict[str, list[float]]:
    return {k: [*past.get(k, []), *(float(v) for v in new.get(k, []))]
            for k in (new or past)}


def _epoch_of(fitted: Any) -> int:
    return int(getattr(fitted, "epoch", [0])[-1]) if getattr(fitted, "epoch", None) else 0


@dataclass
class Resumed:
    model: Any
    epochs_done: int
    history: dict[str, list[float]]
    seconds: float


class Checkpoint:
    """One run's checkpoint: ``model.keras`` (weights and optimizer state) and ``state.json``
    (epochs done, history, seconds spent), valid only for the settings that made it."""

    def __init__(self, folder: Path, cfg: Config) -> None:
        self.folder = folder
        self.model_path, self.state_path = folder / "model.keras", folder / "state.json"
        settings = {k: v for k, v in as_dict(cfg).items() if k in ("train", "model", "data")}
        self.fingerprint = hashlib.sha256(
            json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def load(self) -> Resumed | None:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        if state.get("fingerprint") != self.fingerprint or not self.model_path.is_file():
            return None  # another run's, or a different configuration: start afresh
        model = keras_module().saving.load_model(self.model_path)
        return Resumed(model, int(state["epochs_done"]), state["history"],
                       float(state.get("seconds", 0.0)))

    def save(self, model: Any, epochs_done: int, history: dict[str, list[float]],
             seconds: float) -> None:
        """Both files replaced atomically, the model first: a crash leaves a valid pair."""
        self.folder.mkdir(parents=True, exist_ok=True)
        next_model = self.folder / "model.next.keras"
        model.save(next_model)
        os.replace(next_model, self.model_path)
        next_state = self.folder / "state.next.json"
        next_state.write_text(json.dumps({"fingerprint": self.fingerprint,
                                          "epochs_done": epochs_done, "history": history,
                                          "seconds": round(seconds, 1)}))
        os.replace(next_state, self.state_path)


def _CheckpointCallback(checkpoint: Checkpoint, past: dict[str, list[float]],
                        stopped: list[str]) -> Any:
    """Saves the checkpoint after each completed epoch (never after one cut short)."""
    keras = keras_module()

    class Callback(keras.callbacks.Callback):  # type: ignore[name-defined]
        def on_train_begin(self, logs: Any = None) -> None:
            self.history = {k: list(v) for k, v in past.items()}
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if stopped:
                return
            for key, value in (logs or {}).items():
                self.history.setdefault(key, []).append(float(value))
            checkpoint.save(self.model, epoch + 1, self.history, time.perf_counter() - self.t0)

    return Callback()


class _ReporterCallback:
    """Adapts Keras callbacks to our reporter and asks ``stop`` after every batch; built
    lazily so keras stays unimported."""

    def __new__(cls, reporter: TrainReporter, stop: StopCheck | None = None,
                stopped: list[str] | None = None) -> Any:
        keras = keras_module()
        reasons: list[str] = [] if stopped is None else stopped

        class Callback(keras.callbacks.Callback):  # type: ignore[name-defined]
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self.epoch, self.t0 = epoch, time.perf_counter()

            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                reporter.batch(self.epoch, batch + 1, {k: float(v) for k, v in (logs or {}).items()})
                if stop is not None and not reasons and (reason := stop()):
                    reasons.append(reason)
                    self.model.stop_training = True

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                if reasons:
                    return  # an epoch cut short is neither reported nor saved
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
