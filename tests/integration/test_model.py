"""The shipped model and the training path, on the real dataset."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fmnist import config
from fmnist.cli import app
from fmnist.model import artifacts
from fmnist.model.predictor import Predictor
from fmnist.testing.processes import ROOT

pytestmark = pytest.mark.slow
runner = CliRunner()
LABELS = json.loads((ROOT / "Images" / "labels.json").read_text())


def test_predict_classifies_every_sample_image_correctly() -> None:
    files = [str(ROOT / "Images" / name) for name in sorted(LABELS)]
    result = runner.invoke(app, ["predict", "--json", *files])
    assert result.exit_code == 0, result.output
    for answer in json.loads(result.stdout):
        name = answer["file"].rsplit("/", 1)[-1]
        assert answer["label"] == LABELS[name]["label"], answer
        assert answer["class_name"] == LABELS[name]["class_name"]
        assert len(answer["top_k"]) == 3 and answer["top_k"][0]["label"] == answer["label"]


def test_predict_reports_bad_files_and_still_classifies_the_good_ones(tmp_path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    good = ROOT / "Images" / "bag8.png"
    result = runner.invoke(app, ["predict", "--json", str(empty), str(good), str(text),
                                 str(tmp_path / "missing.png")])
    assert result.exit_code == 3
    answers = json.loads(result.stdout)
    assert [a.get("error", {}).get("code") for a in answers] == [
        "empty_payload", None, "unsupported_format", "unreadable_file"]
    assert answers[1]["class_name"] == "Bag"


def test_shipped_default_model_meets_its_accuracy_and_meta_contract() -> None:
    cfg = config.load(env={})
    meta = artifacts.read_meta(cfg.weights_path)
    for key in ("class_names", "input", "preprocessing", "metrics", "config", "versions",
                "dataset", "version"):
        assert key in meta, key
    assert meta["version"] == artifacts.file_version(cfg.weights_path)
    assert set(meta["dataset"]) >= {"t10k-images-idx3-ubyte", "train-images-idx3-ubyte"}
    result = runner.invoke(app, ["evaluate", "--json"])
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.stdout)
    assert evaluation["accuracy"] >= 0.93
    assert abs(evaluation["accuracy"] - meta["metrics"]["test_accuracy"]) < 1e-3
    assert len(evaluation["per_class"]) == 10
    assert sum(map(sum, evaluation["confusion"])) == 10000


def test_padding_to_a_bucket_does_not_change_predictions() -> None:
    cfg = config.load(env={})
    predictor = Predictor(cfg.weights_path, max_batch=64)
    from fmnist import data

    images = data.load_split("test", data.locate(cfg.data)).images[:37].astype(np.float32)
    together = predictor.probabilities(images)  # padded to 64
    alone = np.concatenate([predictor.probabilities(images[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(together[:5], alone, atol=1e-5)


def _train_tiny(tmp_path, seed: int) -> tuple[dict, str]:
    env = {"FMNIST_MODEL__WEIGHTS_DIR": str(tmp_path), "FMNIST_MODEL__NAME": "tiny",
           "FMNIST_MODEL__FILTERS": "8,16", "FMNIST_MODEL__CONVS_PER_STAGE": "1"}
    result = runner.invoke(app, ["train", "--json", "--limit", "1200", "--epochs", "3",
                                 "--seed", str(seed), "--batch-size", "32"], env=env)
    assert result.exit_code == 0, result.output
    weights = tmp_path / "tiny.keras"
    model, _ = artifacts.load_model(weights)
    digest = hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights()))
    return json.loads(result.stdout), digest.hexdigest()


def test_training_on_a_slice_writes_weights_meta_and_curve_deterministically(tmp_path) -> None:
    first, digest = _train_tiny(tmp_path / "a", seed=3)
    assert first["epochs"] == 3 and 0.0 <= first["test_accuracy"] <= 1.0
    meta = json.loads((tmp_path / "a" / "tiny.meta.json").read_text())
    # It learns: training accuracy far above chance (0.1). (Test accuracy of so short a run
    # says little: batch-norm's running statistics need more steps than 100 to settle.)
    assert meta["history"]["accuracy"][-1] > 0.5
    for suffix in (".keras", ".meta.json", ".curve.png"):
        assert (tmp_path / "a" / f"tiny{suffix}").is_file()
    assert meta["config"]["train"]["seed"] == 3 and meta["history"]["loss"]
    # The default profile learns from the shipped full model's softened predictions.
    assert meta["config"]["train"]["teacher"].endswith("weights/fmnist-full.keras")
    _, again = _train_tiny(tmp_path / "b", seed=3)
    assert again == digest  # same seed, same weights on CPU
    _, other = _train_tiny(tmp_path / "c", seed=4)
    assert other != digest
