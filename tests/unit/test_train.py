"""Distillation targets: the teacher's softened predictions blended with the labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fmnist import config
from fmnist.errors import ModelError
from fmnist.model import artifacts, calibration, train


def test_softening_at_temperature_one_changes_nothing_and_higher_spreads_the_mass() -> None:
    probs = np.array([[0.90, 0.08, 0.02], [0.2, 0.3, 0.5]], np.float32)
    np.testing.assert_allclose(calibration.soften(probs, 1.0), probs, rtol=1e-5)
    soft = calibration.soften(probs, 2.0)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
    assert soft[0, 0] < probs[0, 0] and soft[0, 2] > probs[0, 2]  # mass moves to the tail
    assert (soft.argmax(axis=1) == probs.argmax(axis=1)).all()  # the ranking stays


def test_targets_blend_labels_and_teacher_by_the_distill_weight(
        monkeypatch: pytest.MonkeyPatch) -> None:
    teacher_probs = np.full((3, 10), 0.1, np.float32)  # an undecided teacher

    def fake_teacher(x: np.ndarray, training: bool) -> np.ndarray:
        assert not training and x.shape[1:] == (28, 28, 1)
        return teacher_probs[:len(x)]

    monkeypatch.setattr(artifacts, "load_model", lambda path: (fake_teacher, {}))
    cfg = config.load(flags={"train.teacher": Path(__file__), "train.distill_weight": 0.7},
                      env={})  # any existing file: the fake loads it
    onehot = np.eye(10, dtype=np.float32)[[0, 3, 9]]
    targets = train.distillation_targets(cfg, np.zeros((3, 28, 28), np.uint8), onehot)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(targets[0, 0], 0.3 + 0.7 * 0.1, rtol=1e-6)
    np.testing.assert_allclose(targets[0, 1], 0.7 * 0.1, rtol=1e-6)


def test_a_missing_teacher_says_how_to_make_one_or_go_without(tmp_path: Path) -> None:
    cfg = config.load(flags={"train.teacher": tmp_path / "nope.keras"}, env={})
    with pytest.raises(ModelError) as info:
        train.distillation_targets(cfg, np.zeros((1, 28, 28), np.uint8), np.eye(10)[:1])
    assert "nope.keras (train.teacher), does not exist" in info.value.message
    assert "configs/train-full.yaml" in info.value.hint and "FMNIST_TRAIN__TEACHER=" in info.value.hint


def test_fitted_temperature_sharpens_an_under_confident_model_without_changing_its_answers() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (4000, 10))
    sharp = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    # Labels drawn from `sharp` itself: it is calibrated by construction.
    labels = np.array([rng.choice(10, p=p / p.sum()) for p in sharp.astype(np.float64)])
    timid = calibration.soften(sharp, 2.5)  # what a student of softened targets outputs
    t = calibration.fit_temperature(timid, labels)
    assert 0.3 < t < 0.5  # undoes the 2.5 (1 / 2.5 = 0.4)
    fixed = calibration.soften(timid, t)
    assert calibration.nll(fixed, labels) < calibration.nll(timid, labels)
    assert (fixed.argmax(axis=1) == timid.argmax(axis=1)).all()
