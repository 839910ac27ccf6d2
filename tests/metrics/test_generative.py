"""Generative metrics equal scipy / brute-force references, are chunk-invariant, order good vs
degraded feature sets correctly, and guard small sets with a warning and NaN.

Tolerances: Fréchet distance and KID are float64 on the host (rtol 1e-9 / 1e-10 vs the
references). Neighbour metrics select neighbours in float32 JAX and report float64 distances,
so radii and distances match the float64 brute force to rtol 1e-9 and fractions exactly.
"""

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance

from cxrjax.metrics import generative

K = 5


def _features(n, d=16, seed=0, scale=1.0, shift=0.0):
    return np.random.default_rng(seed).normal(size=(n, d)) * scale + shift


def _brute_prdc(real, fake, k):
    """Kynkäänniemi / Naeem definitions from full float64 distance matrices."""
    d_rr = scipy.spatial.distance.cdist(real, real)
    d_ff = scipy.spatial.distance.cdist(fake, fake)
    d_rf = scipy.spatial.distance.cdist(real, fake)  # [N, M]
    # Column 0 of each sorted row is the point itself (distance 0): the k-th neighbour is at k.
    r_real = np.sort(d_rr, axis=1)[:, k]
    r_fake = np.sort(d_ff, axis=1)[:, k]
    inside_real = d_rf <= r_real[:, None]
    return {
        "precision": inside_real.any(axis=0).mean(),
        "recall": (d_rf <= r_fake[None, :]).any(axis=1).mean(),
        "density": inside_real.sum(axis=0).mean() / k,
        "coverage": (d_rf.min(axis=1) <= r_real).mean(),
    }


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def _scipy_fd(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)


def test_frechet_matches_scipy_reference():
    a, b = _features(400, 12, seed=1), _features(300, 12, seed=2, scale=1.3, shift=0.2)
    expected = _scipy_fd(a, b)
    assert generative.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    stats = (*generative.feature_stats(a), *generative.feature_stats(b))
    assert generative.frechet_distance_from_stats(*stats) == pytest.approx(expected, rel=1e-9)
    # float32 features are accumulated in float64.
    got32 = generative.frechet_distance(a.astype(np.float32), b.astype(np.float32))
    assert got32 == pytest.approx(_scipy_fd(a.astype(np.float32), b.astype(np.float32)), rel=1e-6)


def test_frechet_of_a_shift_is_the_squared_shift():
    a = _features(200, 8, seed=3)
    shift = np.linspace(-1, 1, 8)
    assert generative.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert generative.frechet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-9)


def test_frechet_singular_product_falls_back_to_offset(monkeypatch):
    a, b = _features(50, 6, seed=4), _features(50, 6, seed=5)
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def failing_once(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(generative.scipy.linalg, "sqrtm", failing_once)
    mu1, s1 = generative.feature_stats(a)
    mu2, s2 = generative.feature_stats(b)
    with pytest.warns(generative.MetricWarning, match="singular"):
        got = generative.frechet_distance_from_stats(mu1, s1, mu2, s2, eps=1e-3)
    offset = 1e-3 * np.eye(6)
    root = real_sqrtm((s1 + offset) @ (s2 + offset)).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
    assert len(calls) == 2 and got == pytest.approx(expected, rel=1e-9)


def test_frechet_guards():
    # sqrtm(-I) = i * I: a large imaginary part is an error, not a silently dropped one.
    with pytest.raises(ValueError, match="imaginary"):
        generative.frechet_distance_from_stats(np.zeros(3), -np.eye(3), np.zeros(3), np.eye(3))
    with pytest.warns(generative.MetricWarning, match="fewer samples"):
        value = generative.frechet_distance(_features(10, 32, seed=6), _features(10, 32, seed=7))
    assert np.isfinite(value) and isinstance(value, float)
    with pytest.warns(generative.MetricWarning, match=">= 2 samples"):
        assert math.isnan(generative.frechet_distance(_features(1), _features(10)))
    with pytest.raises(ValueError, match="dims differ"):
        generative.frechet_distance(_features(10, 4), _features(10, 5))


# ---------------------------------------------------------------------------------------------
# KID


def _brute_mmd2(x, y):
    """Unbiased MMD^2 by explicit double loops over pairs (the definition, not the matmul)."""
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1.0) ** 3
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / m**2


def test_kid_on_whole_sets_equals_brute_force():
    real, fake = _features(20, 6, seed=8), _features(20, 6, seed=9, shift=0.5)
    # Every subset is then a permutation of the whole set, so all subsets agree exactly.
    out = generative.kid(real, fake, subset_size=20, num_subsets=4)
    assert out["kid"] == pytest.approx(_brute_mmd2(real, fake), rel=1e-10)
    assert out["kid_std_err"] < 1e-12


def test_kid_subsets_follow_documented_seeded_draws():
    real, fake = _features(30, 5, seed=10), _features(25, 5, seed=11, scale=1.5)
    out = generative.kid(real, fake, subset_size=8, num_subsets=6, seed=3)
    rng = np.random.default_rng(3)
    values = []
    for _ in range(6):
        x = real[rng.choice(30, 8, replace=False)]
        y = fake[rng.choice(25, 8, replace=False)]
        values.append(_brute_mmd2(x, y))
    assert out["kid"] == pytest.approx(np.mean(values), rel=1e-10)
    assert out["kid_std_err"] == pytest.approx(np.std(values, ddof=1) / np.sqrt(6), rel=1e-8)
    other = generative.kid(real, fake, subset_size=8, num_subsets=6, seed=4)
    assert other["kid"] != out["kid"]
    fast = generative.kid(real, fake, subset_size=8, num_subsets=6, seed=3, dtype=np.float32)
    assert fast["kid"] == pytest.approx(out["kid"], abs=1e-5)


def test_kid_guards():
    with pytest.warns(generative.MetricWarning, match="reduced from 50 to 12"):
        out = generative.kid(_features(12), _features(40), subset_size=50, num_subsets=3)
    assert out["subset_size"] == 12 and np.isfinite(out["kid"])
    with pytest.warns(generative.MetricWarning, match=">= 2 samples"):
        out = generative.kid(_features(1), _features(40))
    assert math.isnan(out["kid"]) and math.isnan(out["kid_std_err"]) and "reason" in out


# ---------------------------------------------------------------------------------------------
# Exact chunked neighbour search and PRDC


@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_knn_matches_brute_force(chunk_size):
    x, y = _features(53, 9, seed=12), _features(41, 9, seed=13, shift=3.0)
    dist, idx = generative.knn_distances(x, k=4, chunk_size=chunk_size)
    full = scipy.spatial.distance.cdist(x, x)
    np.fill_diagonal(full, np.inf)
    np.testing.assert_array_equal(idx, np.argsort(full, axis=1)[:, :4])
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, :4], rtol=1e-9)

    dist, idx = generative.knn_distances(y, x, k=3, chunk_size=chunk_size)
    cross = scipy.spatial.distance.cdist(y, x)
    np.testing.assert_array_equal(idx, np.argsort(cross, axis=1)[:, :3])
    np.testing.assert_allclose(dist, np.sort(cross, axis=1)[:, :3], rtol=1e-9)

    radii = generative.knn_radii(x, k=K, chunk_size=chunk_size)
    np.testing.assert_allclose(radii, np.sort(full, axis=1)[:, K - 1], rtol=1e-9)


def test_knn_keeps_duplicates_but_not_self():
    x = np.concatenate([_features(10, 4, seed=14), _features(1, 4, seed=14)])  # row 10 == row 0
    dist, idx = generative.knn_distances(x, k=1)
    assert idx[0, 0] == 10 and idx[10, 0] == 0 and dist[0, 0] == 0.0
    with pytest.raises(ValueError, match="k=11"):
        generative.knn_distances(x, k=11)


@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_prdc_matches_brute_force(chunk_size):
    real, fake = _features(70, 8, seed=15), _features(55, 8, seed=16, scale=1.4, shift=0.3)
    got = generative.prdc(real, fake, k=K, chunk_size=chunk_size)
    expected = _brute_prdc(real, fake, K)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key


def test_prdc_small_sets_give_nan_with_reason():
    with pytest.warns(generative.MetricWarning, match="need >= 6 real"):
        out = generative.prdc(_features(K), _features(30), k=K)
    assert all(math.isnan(out[key]) for key in ("precision", "density", "coverage"))
    assert np.isfinite(out["recall"]) and "reason" in out
    with pytest.warns(generative.MetricWarning, match="recall needs"):
        out = generative.prdc(_features(30), _features(0), k=K)
    assert all(math.isnan(out[key]) for key in ("precision", "recall", "density", "coverage"))


# ---------------------------------------------------------------------------------------------
# Memorisation


def test_memorisation_finds_planted_copies():
    rng = np.random.default_rng(17)
    real = rng.normal(size=(120, 8, 8))  # "images": flattened inside
    fake = rng.normal(size=(60, 8, 8))
    fake[[5, 40]] = real[[3, 77]] + 1e-6 * rng.normal(size=(2, 8, 8))
    out = generative.memorisation(real, fake, quantile=0.01, num_pairs=4, chunk_size=16)

    flat_r, flat_f = real.reshape(120, -1), fake.reshape(60, -1)
    cross = scipy.spatial.distance.cdist(flat_f, flat_r)
    np.testing.assert_array_equal(out["nn_index"], cross.argmin(1))
    np.testing.assert_allclose(out["nn_distance"], cross.min(1), rtol=1e-9)
    within = scipy.spatial.distance.cdist(flat_r, flat_r)
    np.fill_diagonal(within, np.inf)
    np.testing.assert_allclose(out["real_nn_distance"], within.min(1), rtol=1e-9)
    assert out["threshold"] == pytest.approx(np.quantile(within.min(1), 0.01), rel=1e-9)
    assert out["near_copy_rate"] == pytest.approx(2 / 60)
    assert {tuple(p) for p in out["closest_pairs"][:2]} == {(5, 3), (40, 77)}
    assert out["closest_pairs"].shape == (4, 2) and np.all(np.diff(out["closest_distance"]) >= 0)


def test_memorisation_small_sets_give_nan_with_reason():
    with pytest.warns(generative.MetricWarning, match=">= 2 real"):
        out = generative.memorisation(_features(1), _features(5))
    assert math.isnan(out["near_copy_rate"]) and math.isnan(out["threshold"]) and "reason" in out
    assert out["closest_pairs"].shape == (0, 2)


# ---------------------------------------------------------------------------------------------
# Per class, and good vs degraded ordering


def test_per_class_runs_metric_on_each_group_and_guards_missing_class():
    real, fake = _features(80, 6, seed=18), _features(60, 6, seed=19)
    real_labels, fake_labels = np.arange(80) % 2, np.zeros(60, int)
    fake_labels[:30] = 2  # class 2 has no real samples, class 1 no synthetic ones
    with pytest.warns(generative.MetricWarning):
        out = generative.per_class(generative.prdc, real, real_labels, fake, fake_labels, k=3)
    assert set(out) == {0, 1, 2}
    expected = generative.prdc(real[real_labels == 0], fake[fake_labels == 0], k=3)
    assert out[0] == expected
    assert math.isnan(out[1]["precision"]) and math.isnan(out[2]["recall"])


def test_metrics_order_good_above_degraded():
    real = _features(300, 16, seed=20)
    good = _features(300, 16, seed=21)
    noisy = good + np.random.default_rng(22).normal(size=good.shape)  # off the real manifold
    collapsed = 0.2 * good  # mode collapse: little of the real support
    copies = np.concatenate([real[:100], good[:200]])
    kid = lambda x: generative.kid(real, x, subset_size=100, num_subsets=10)["kid"]
    fd_good, kid_good = generative.frechet_distance(real, good), kid(good)
    for name, degraded in (("noisy", noisy), ("collapsed", collapsed)):
        assert generative.frechet_distance(real, degraded) > fd_good, name
        assert kid(degraded) > kid_good, name
    p = {"good": generative.prdc(real, good), "noisy": generative.prdc(real, noisy)}
    p["collapsed"] = generative.prdc(real, collapsed)
    assert p["good"]["precision"] > p["noisy"]["precision"]
    assert p["good"]["density"] > p["noisy"]["density"]
    assert p["good"]["recall"] > p["collapsed"]["recall"]
    assert p["good"]["coverage"] > p["collapsed"]["coverage"]
    assert (
        generative.memorisation(real, copies)["near_copy_rate"]
        > generative.memorisation(real, good)["near_copy_rate"]
    )
