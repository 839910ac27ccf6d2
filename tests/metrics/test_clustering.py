"""Cluster scores equal sklearn, are chunk-invariant, scale to N = 30,000, and rank a faithful
generator above degraded ones.

Tolerances: Davies-Bouldin and Calinski-Harabasz are float64 numpy: rtol 1e-10 vs sklearn.
Silhouette runs in JAX: float32 by default, |diff| <= 1e-5 vs sklearn (the score lies in
[-1, 1]); float64 under `jax.enable_x64`, rtol 1e-9.
"""

import math
import time

import jax
import numpy as np
import pytest
import scipy.spatial.distance
from sklearn import cluster as sk_cluster
from sklearn import metrics as sk_metrics

from cxrjax.metrics import clustering, generative


def _blobs(sizes, d=8, gap=2.0, seed=0):
    """Gaussian clusters whose centres are `gap` apart along different axes."""
    rng = np.random.default_rng(seed)
    x = [
        rng.normal(size=(n, d)) + gap * np.eye(d)[i % d] * (1 + i // d) for i, n in enumerate(sizes)
    ]
    return np.concatenate(x), np.repeat(np.arange(len(sizes)), sizes)


@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_scores_match_sklearn(chunk_size):
    x, labels = _blobs([60, 45, 30, 25], seed=1)
    labels = np.array(["a", "b", "c", "d"])[labels]  # any hashable labels
    got = clustering.cluster_scores(x.astype(np.float32), labels, chunk_size=chunk_size)
    assert got["silhouette"] == pytest.approx(sk_metrics.silhouette_score(x, labels), abs=1e-5)
    # float32 features are reduced in float64: the reference is sklearn on their exact upcast.
    x32_as_64 = x.astype(np.float32).astype(np.float64)
    assert got["davies_bouldin"] == pytest.approx(
        sk_metrics.davies_bouldin_score(x32_as_64, labels), rel=1e-10
    )
    assert got["calinski_harabasz"] == pytest.approx(
        sk_metrics.calinski_harabasz_score(x32_as_64, labels), rel=1e-10
    )
    np.testing.assert_allclose(
        clustering.silhouette_samples(x, labels, chunk_size=chunk_size),
        sk_metrics.silhouette_samples(x, labels),
        atol=1e-5,
    )
    assert clustering.davies_bouldin_score(x, labels) == pytest.approx(
        sk_metrics.davies_bouldin_score(x, labels), rel=1e-10
    )
    assert clustering.calinski_harabasz_score(x, labels) == pytest.approx(
        sk_metrics.calinski_harabasz_score(x, labels), rel=1e-10
    )


def test_silhouette_float64_matches_sklearn_tightly():
    x, labels = _blobs([40, 30, 20], seed=2)
    with jax.enable_x64(True):
        got = clustering.silhouette_samples(x, labels, chunk_size=16)
    np.testing.assert_allclose(got, sk_metrics.silhouette_samples(x, labels), rtol=1e-9)


def test_silhouette_is_chunk_invariant():
    x, labels = _blobs([50, 40, 33], d=5, seed=3)
    small = clustering.silhouette_samples(x, labels, chunk_size=7)
    large = clustering.silhouette_samples(x, labels, chunk_size=1000)
    np.testing.assert_allclose(small, large, atol=1e-6)


def test_singleton_cluster_scores_zero_like_sklearn():
    x, labels = _blobs([20, 15, 1], seed=4)
    with pytest.warns(generative.MetricWarning, match="one member"):
        got = clustering.silhouette_samples(x, labels)
    assert got[-1] == 0.0
    np.testing.assert_allclose(got, sk_metrics.silhouette_samples(x, labels), atol=1e-5)


@pytest.mark.parametrize(
    "fn",
    [
        clustering.silhouette_score,
        clustering.davies_bouldin_score,
        clustering.calinski_harabasz_score,
    ],
)
def test_degenerate_labels_give_nan_with_warning(fn):
    x = np.random.default_rng(5).normal(size=(6, 3))
    for labels in (np.zeros(6), np.arange(6), np.zeros(0)):
        with pytest.warns(generative.MetricWarning, match="number of clusters"):
            assert math.isnan(fn(x[: len(labels)], labels))
    with pytest.warns(generative.MetricWarning, match="number of clusters"):
        out = clustering.cluster_scores(x, np.zeros(6))
    assert math.isnan(out["silhouette"]) and "reason" in out


def test_silhouette_scales_to_30k_samples():
    rng = np.random.default_rng(6)
    n, d = 30_000, 64
    labels = rng.integers(0, 3, n)
    x = (rng.normal(size=(n, d)) + 1.5 * np.eye(d)[labels]).astype(np.float32)
    start = time.perf_counter()
    got = clustering.silhouette_samples(x, labels, chunk_size=1024)
    print(f"silhouette N={n} D={d}: {time.perf_counter() - start:.2f} s")
    # sklearn would need an N x N matrix; check 200 rows against float64 brute force instead.
    rows = rng.choice(n, 200, replace=False)
    dist = scipy.spatial.distance.cdist(x[rows].astype(np.float64), x.astype(np.float64))
    dist[np.arange(200), rows] = 0.0
    counts = np.bincount(labels)
    means = np.stack([dist[:, labels == c].sum(1) for c in range(3)], axis=1) / counts
    own = labels[rows]
    a = means[np.arange(200), own] * counts[own] / (counts[own] - 1)
    means[np.arange(200), own] = np.inf
    b = means.min(1)
    np.testing.assert_allclose(got[rows], (b - a) / np.maximum(a, b), atol=1e-5)


def test_real_vs_synthetic_ranks_faithful_generator_as_inseparable():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(300, 10))
    good = rng.normal(size=(250, 10))
    shifted = rng.normal(size=(250, 10)) + 1.0
    good_scores = clustering.real_vs_synthetic(real, good)
    bad_scores = clustering.real_vs_synthetic(real, shifted)
    assert abs(good_scores["silhouette"]) < 0.02
    assert good_scores["silhouette"] < bad_scores["silhouette"]
    assert good_scores["davies_bouldin"] > bad_scores["davies_bouldin"]
    assert good_scores["calinski_harabasz"] < bad_scores["calinski_harabasz"]
    per_class = generative.per_class(
        clustering.real_vs_synthetic, real, np.arange(300) % 2, good, np.arange(250) % 2
    )
    assert set(per_class) == {0, 1} and abs(per_class[1]["silhouette"]) < 0.05


def test_class_structure_reports_each_part():
    real, real_labels = _blobs([50, 40], gap=4.0, seed=8)
    fake, fake_labels = _blobs([30, 30], gap=4.0, seed=9)
    out = clustering.class_structure(real, real_labels, fake, fake_labels)
    expected = {
        "real": clustering.cluster_scores(real, real_labels),
        "synthetic": clustering.cluster_scores(fake, fake_labels),
        "pooled": clustering.cluster_scores(
            np.concatenate([real, fake]), np.concatenate([real_labels, fake_labels])
        ),
    }
    assert out == {f"{part}/{key}": v for part, s in expected.items() for key, v in s.items()}
    assert out["synthetic/silhouette"] > 0.2  # the blobs do carry class structure


def test_kmeans_agreement_matches_sklearn_and_detects_wrong_classes():
    real, real_labels = _blobs([80, 70, 60], gap=6.0, seed=10)
    fake, fake_labels = _blobs([40, 40, 40], gap=6.0, seed=11)
    out = clustering.kmeans_agreement(real, fake, fake_labels, real_labels=real_labels, seed=0)
    kmeans = sk_cluster.KMeans(n_clusters=3, n_init=10, random_state=0).fit(real)
    assigned = kmeans.predict(fake)
    assert out["ari"] == sk_metrics.adjusted_rand_score(fake_labels, assigned)
    assert out["nmi"] == sk_metrics.normalized_mutual_info_score(fake_labels, assigned)
    assert out["ari"] > 0.95 and out["real_ari"] > 0.95 and out["n_clusters"] == 3
    shuffled = np.random.default_rng(12).permutation(fake_labels)
    assert clustering.kmeans_agreement(real, fake, shuffled)["ari"] < 0.1
    with pytest.warns(generative.MetricWarning, match="k-means"):
        guard = clustering.kmeans_agreement(real, fake[:1], fake_labels[:1])
    assert math.isnan(guard["ari"]) and "reason" in guard
