"""Synthetic-data utility metrics against hand computations and reference implementations."""

import numpy as np
import pytest
import scipy.stats

from cxrjax.metrics import generative, utility

NAMES = ("normal", "pneumonia")


def test_class_fidelity_by_hand():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
    labels = np.array([0, 0, 0, 1])
    out = utility.class_fidelity(probs, labels, NAMES)
    assert out["normal"] == {
        "n": 3,
        "assigned_fraction": pytest.approx(2 / 3),
        "mean_confidence": pytest.approx((0.9 + 0.4 + 0.7) / 3),
    }
    assert out["pneumonia"]["assigned_fraction"] == 1.0
    assert out["pneumonia"]["mean_confidence"] == pytest.approx(0.8)
    empty = utility.class_fidelity(probs[:3], labels[:3], NAMES)["pneumonia"]
    assert empty == {"n": 0, "assigned_fraction": None, "mean_confidence": None}


def test_acceptance_thresholds_keep_the_requested_share_of_real_images():
    rng = np.random.default_rng(0)
    p0 = rng.uniform(0.3, 1.0, 1000)
    probs = np.stack([p0, 1 - p0], axis=1)
    labels = np.zeros(1000, np.int64)
    tau = utility.acceptance_thresholds(probs, labels, NAMES, keep=0.95)
    assert tau["normal"] == pytest.approx(np.quantile(p0, 0.05))
    assert tau["pneumonia"] is None
    assert np.mean(p0 >= tau["normal"]) == pytest.approx(0.95, abs=0.002)


def test_accept_needs_the_intended_top_class_and_the_threshold():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.4, 0.6], [0.1, 0.9]])
    labels = np.array([0, 0, 0, 1])
    mask = utility.accept(probs, labels, {"normal": 0.7, "pneumonia": 0.5}, NAMES)
    np.testing.assert_array_equal(mask, [True, False, False, True])
    # A threshold below 0.5 still needs the intended class on top.
    mask = utility.accept(probs, labels, {"normal": 0.3, "pneumonia": 0.5}, NAMES)
    np.testing.assert_array_equal(mask, [True, True, False, True])


def test_gate_fails_a_generator_whose_class_a_images_are_labelled_b():
    """Images of class A (pneumonia-looking: the judge says pneumonia) written as class B
    (normal) are exactly the failure the gate exists for."""
    rng = np.random.default_rng(1)
    real_probs = np.concatenate([rng.uniform(0.7, 1.0, 100), rng.uniform(0.0, 0.3, 100)])
    real = utility.class_fidelity(
        np.stack([real_probs, 1 - real_probs], 1), np.repeat([0, 1], 100), NAMES
    )
    swapped = rng.uniform(0.0, 0.3, 100)  # judged pneumonia, intended normal
    synth = utility.class_fidelity(np.stack([swapped, 1 - swapped], 1), np.zeros(100), NAMES)
    verdict = utility.gate(synth, real, margin=0.10, classes=["normal"])
    assert not verdict["adequate"] and verdict["failed_classes"] == ["normal"]
    assert verdict["per_class"]["normal"]["gap"] == pytest.approx(1.0)
    faithful = rng.uniform(0.65, 1.0, 100)
    synth = utility.class_fidelity(np.stack([faithful, 1 - faithful], 1), np.zeros(100), NAMES)
    assert utility.gate(synth, real, margin=0.10, classes=["normal"])["adequate"]
    missing = utility.class_fidelity(np.zeros((0, 2)), np.zeros(0), NAMES)
    assert not utility.gate(missing, real, margin=0.1, classes=["normal"])["adequate"]


def test_distance_matrix_cells_equal_the_reference_metrics():
    rng = np.random.default_rng(2)
    real = np.concatenate([rng.normal(0, 1, (40, 3)), rng.normal(3, 1, (40, 3))])
    real_labels = np.repeat([0, 1], 40)
    synth = np.concatenate([rng.normal(2.8, 1, (30, 3)), rng.normal(3, 1, (30, 3))])
    synth_labels = np.repeat([0, 1], 30)
    m = utility.distance_matrix(
        real, real_labels, synth, synth_labels, NAMES, kid_subset_size=20, kid_subsets=5
    )
    assert m["rows"] == ["synthetic normal", "synthetic pneumonia"]
    for r in range(2):
        for c in range(2):
            fake, ref = synth[synth_labels == r], real[real_labels == c]
            assert m["fd"][r][c] == pytest.approx(generative.frechet_distance(ref, fake))
            kid = generative.kid(ref, fake, subset_size=20, num_subsets=5, seed=0)["kid"]
            assert m["kid"][r][c] == pytest.approx(kid)
    # "synthetic normals sit nearer real pneumonia": visible in the matrix.
    assert utility.nearest_real_class(m)["synthetic normal"] == "real pneumonia"
    assert m["min_images"][0][0] == 30 and m["feature_dim"] == 3


def test_rank_agreement_matches_scipy_and_orients_lower_is_better():
    fid = {"a": 10.0, "b": 20.0, "c": 30.0, "d": 25.0}
    gain = {"a": 0.05, "b": 0.01, "c": -0.02, "d": 0.0}
    out = utility.rank_agreement(fid, gain, higher_is_better=False)
    x = [-fid[k] for k in "abcd"]
    y = [gain[k] for k in "abcd"]
    assert out["kendall_tau"] == pytest.approx(scipy.stats.kendalltau(x, y).statistic)
    assert out["spearman_rho"] == pytest.approx(scipy.stats.spearmanr(x, y).statistic)
    assert out["kendall_tau"] == pytest.approx(1.0)
    few = utility.rank_agreement({"a": 1.0, "b": None}, gain, higher_is_better=True)
    assert few["n"] == 1 and few["kendall_tau"] is None


def test_fine_detail_against_a_hand_computed_laplacian():
    # One bright pixel in the middle of a 5x5 zero image: |4 * 1| at it, |-1| at its four
    # neighbours, 0 at the other 4 interior pixels -> mean over the 3x3 interior = 8 / 9.
    spike = np.zeros((1, 5, 5), np.uint8)
    spike[0, 2, 2] = 255
    np.testing.assert_allclose(utility.laplacian_energy(spike), [8 / 9], rtol=1e-6)
    flat = np.full((3, 5, 5), 128, np.uint8)  # no detail at all
    np.testing.assert_allclose(utility.laplacian_energy(flat[..., None]), 0.0, atol=1e-6)
    detail = utility.fine_detail(np.concatenate([spike, flat]), spike)
    assert detail["ratio"] == pytest.approx(0.25) and detail["n"] == [4, 1]
    assert utility.fine_detail(spike, flat)["ratio"] is None  # real images without detail
