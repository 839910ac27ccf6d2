"""Calibration metrics against hand-computed values; temperature scaling; the diagram."""

import numpy as np
import pytest

from cxrjax.metrics import calibration


def binary(p):
    p = np.asarray(p, float)
    return np.stack([1 - p, p], axis=1)


def test_ece_and_brier_binary_by_hand():
    p = [0.1, 0.4, 0.8, 0.9, 0.12, 0.18]
    y = np.array([0, 1, 1, 0, 1, 0])
    # Bin [0.1, 0.2) holds 0.1, 0.12, 0.18: mean 0.1333, observed 1/3, gap 0.2, weight 3/6;
    # bins of 0.4, 0.8, 0.9 hold one each: gaps 0.6, 0.2, 0.9, weight 1/6 each.
    expected_ece = 0.2 * 3 / 6 + (0.6 + 0.2 + 0.9) / 6
    expected_brier = (0.01 + 0.36 + 0.04 + 0.81 + 0.7744 + 0.0324) / 6
    result = calibration.summarize(y, binary(p), n_bootstrap=200, seed=0)
    assert result["what"] == "binary"
    assert result["ece"] == pytest.approx(expected_ece)
    assert result["brier"] == pytest.approx(expected_brier)
    low, high = result["ece_ci"]
    assert 0 <= low <= high <= 1
    table = result["reliability"]
    assert table["count"][1] == 3 and table["observed"][1] == pytest.approx(1 / 3)
    assert table["observed"][0] is None  # empty bin


def test_ece_and_brier_multiclass_and_multilabel_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1]])
    labels = np.array([0, 2])
    result = calibration.summarize(labels, probs, n_bootstrap=0)
    # Top-label: 0.7 correct (gap 0.3), 0.6 wrong (gap 0.6), one per bin.
    assert result["ece"] == pytest.approx(0.45)
    # Multi-category Brier: (0.09 + 0.04 + 0.01 + 0.09 + 0.36 + 0.81) / 2.
    assert result["brier"] == pytest.approx(0.7)
    # Multi-label: per finding, then the mean over findings.
    probs = np.array([[0.9, 0.2], [0.3, 0.6]])
    labels = np.array([[1, 0], [0, 0]])
    result = calibration.summarize(labels, probs, class_names=["a", "b"], n_bootstrap=0)
    assert result["per_class"]["a"]["ece"] == pytest.approx((0.1 + 0.3) / 2)
    assert result["per_class"]["b"]["brier"] == pytest.approx((0.04 + 0.36) / 2)
    assert result["ece"] == pytest.approx(((0.1 + 0.3) / 2 + (0.2 + 0.6) / 2) / 2)


def test_temperature_scaling_fixes_overconfidence_and_keeps_ranking(tmp_path):
    rng = np.random.default_rng(0)
    n = 2000
    labels = rng.integers(0, 2, n)
    true_logit = (2 * labels - 1) * 1.0 + rng.normal(0, 1.5, n)
    overconfident = 1 / (1 + np.exp(-3.0 * true_logit))  # logits 3x too large
    val = {"labels": labels[: n // 2], "probs": binary(overconfident[: n // 2])}
    test = {"labels": labels[n // 2 :], "probs": binary(overconfident[n // 2 :])}
    result = calibration.evaluate(
        val, test, class_names=["n", "p"], n_bootstrap=50, figure_path=tmp_path / "rel.png"
    )
    assert 2.0 < result["temperature"] < 4.5
    assert result["test_temperature_scaled"]["ece"] < result["test"]["ece"] / 2
    scaled = calibration.apply_temperature(test["probs"], result["temperature"], multilabel=False)
    np.testing.assert_array_equal(np.argsort(scaled[:, 1]), np.argsort(test["probs"][:, 1]))
    assert (tmp_path / "rel.png").stat().st_size > 1000
    text = calibration.markdown(result)
    assert "| test |" in text and "![Reliability diagram](rel.png)" in text


@pytest.mark.parametrize("num_classes", [2, 3])
def test_bootstrap_resamples_scored_at_once_equal_one_by_one(num_classes):
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(num_classes), 300)
    labels = rng.integers(0, num_classes, 300)
    draws = np.stack([rng.integers(0, 300, 300) for _ in range(40)])
    together = calibration._resampled_points(labels, probs, 10, draws)
    one_by_one = [calibration._point(labels[d], probs[d], 10) for d in draws]
    for key in ("ece", "brier"):
        np.testing.assert_allclose(together[key], [p[key] for p in one_by_one], atol=1e-12)
