"""CheXNet recipe: the paper's loss weights, the validation-loss plateau, CSV multi-label
training with calibration, and the chexnet_cpu preset on a tiny NIH-style folder."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.classifier as classifier_configs
from cxrjax import chexnet
from cxrjax.data import sources
from cxrjax.data.builders import testing
from cxrjax.train import classifier, classifier_run, optim

MULTILABEL = sources.DatasetSpec("toy", ("a", "b", "c"), sources.MULTILABEL)


def test_chexnet_weights_and_loss_follow_the_paper():
    labels = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0], [1, 1, 0], [0, 0, 0]], np.float32)
    weights = classifier.class_weights(MULTILABEL, labels, "chexnet")
    # w+ = |N| / (|P| + |N|), w- = |P| / (|P| + |N|) per finding.
    np.testing.assert_allclose(weights, [[3 / 5, 4 / 5, 4 / 5], [2 / 5, 1 / 5, 1 / 5]])
    logits = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    loss = classifier.make_loss_fn(MULTILABEL, weights)(logits, labels, np.ones(5, bool))
    p = 1 / (1 + np.exp(-logits))
    terms = weights[0] * labels * np.log(p) + weights[1] * (1 - labels) * np.log(1 - p)
    np.testing.assert_allclose(loss, -terms.mean(), rtol=1e-5)
    host = classifier.loss_from_probs(MULTILABEL, weights, labels, p)
    np.testing.assert_allclose(host, -terms.mean(), rtol=1e-5)


def test_val_plateau_divides_the_learning_rate_when_validation_loss_stalls():
    config = classifier_configs.get_config("chexnet_cpu").optim
    tx, _ = optim.make_optimizer(config, 100)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    grads = {"w": jnp.ones(3)}
    first, _ = tx.update(grads, state, params)
    scales = []
    for loss in (1.0, 0.9, 0.95, 0.89, 0.95, 0.96):
        state = optim.plateau_observe(state, loss, config.plateau_factor, config.plateau_patience)
        scales.append(float(optim.plateau_scale(state)))
    # Patience 1: every evaluation that does not beat the best divides by 10.
    np.testing.assert_allclose(scales, [1, 1, 0.1, 0.1, 0.01, 0.001], rtol=1e-6)
    later, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(later["w"], first["w"] * 0.001, rtol=1e-5)


def labelled_config(folder, data_dir, **train):
    config = classifier_configs.get_config("tiny")
    config.data.update(name="image_folder", manual_dir=str(folder), data_dir=str(data_dir))
    config.data.resolution = 16
    config.loss.class_weighting = "chexnet"
    config.optim.update(schedule="val_plateau", warmup_steps=0, plateau_patience=1)
    config.train.update(global_batch_size=8, num_steps=4, eval_every=2, checkpoint_every=2)
    config.train.update(train)
    config.eval.update(batch_size=8, bootstrap=20)
    return config


def test_csv_multilabel_folder_trains_with_calibration_and_resumes_exactly(tmp_path):
    folder = testing.write_labelled_folder(tmp_path / "folder", num_patients=40)
    config = labelled_config(folder, tmp_path / "data")
    whole = classifier_run.train_and_evaluate(config, str(tmp_path / "whole"))
    assert whole["dataset"]["label_kind"] == sources.MULTILABEL
    assert set(whole["test"]["per_class"]) == set(testing.CSV_FINDINGS)
    evals = [row for row in whole["history"] if "val/loss" in row]
    assert [row["step"] for row in evals] == [2, 4] and np.isfinite(evals[0]["val/loss"])
    calibration = whole["calibration"]
    assert 0 <= calibration["test"]["ece"] <= 1 and calibration["temperature"] > 0
    assert set(calibration["test"]["per_class"]) == set(testing.CSV_FINDINGS)
    assert os.path.getsize(tmp_path / "whole" / "reliability.png") > 1000
    assert "## Calibration" in (tmp_path / "whole" / "results.md").read_text()
    # Stopped right after the evaluation at step 2 and resumed: the same run.
    workdir = str(tmp_path / "resumed")
    stopped = classifier_run.train_and_evaluate(config, workdir, stop_at=2)
    assert stopped["finished"] is False
    resumed = classifier_run.train_and_evaluate(config, workdir)
    for name in ("test_predictions.npz", "val_predictions.npz"):
        a, b = np.load(tmp_path / "whole" / name), np.load(os.path.join(workdir, name))
        np.testing.assert_array_equal(a["probs"], b["probs"])
    assert resumed["test"]["macro"]["auc"] == whole["test"]["macro"]["auc"]


def write_torchvision_densenet121(path):
    """A torchvision-format densenet121 state_dict (random weights: the format, not ImageNet)."""
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    torch.save(models.densenet121(weights=None).state_dict(), path)
    return path


def test_chexnet_preset_requires_imagenet_weights(tmp_path):
    config = classifier_configs.get_config("chexnet_cpu")
    with pytest.raises(classifier_run.config_lib.ConfigError, match="model.pretrained"):
        classifier_run.validate(config)


@pytest.mark.slow
def test_chexnet_cpu_preset_runs_a_few_steps_on_a_tiny_nih_folder(tmp_path):
    weights = write_torchvision_densenet121(tmp_path / "densenet121.pth")
    manual_dir = testing.write_nih(tmp_path / "nih")
    config = classifier_configs.get_config("chexnet_cpu")
    config.data.update(manual_dir=str(manual_dir), data_dir=str(tmp_path / "data"))
    config.data.resolution = 32  # DenseNet121's /32: one 1x1 feature map, the fastest compile
    config.model.pretrained = str(weights)
    config.train.update(global_batch_size=4, num_steps=2, eval_every=1, checkpoint_every=2)
    config.eval.update(batch_size=4, bootstrap=10)
    classifier_run.validate(config)
    results = classifier_run.train_and_evaluate(config, str(tmp_path / "run"))
    assert jax.tree.leaves(results["test"]["per_class"])  # 14 findings evaluated
    table = results["chexnet_comparison"]
    assert [row["finding"] for row in table["rows"]] == list(chexnet.PUBLISHED_AUC)
    assert table["paper_mean_auc"] == pytest.approx(0.8414, abs=1e-4)
    assert [row["step"] for row in results["history"] if "val/loss" in row] == [1, 2]
    text = (tmp_path / "run" / "results.md").read_text()
    assert "Per-finding test AUC vs CheXNet" in text and "| Hernia |" in text
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["optim"]["schedule"] == "val_plateau"
