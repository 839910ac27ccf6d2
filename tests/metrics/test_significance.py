"""Tests for cxrjax.metrics.significance: scipy/sklearn agreement, Holm, bootstrap, verdicts."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from cxrjax.metrics import significance as sig


def _arms(n_seeds=5, n=200, seed=0, shift=0.0, decimals=None, prevalence=0.3):
    """Labels [N] and paired score sets [S, N] for a reference arm B and an arm A.

    A's scores move `shift` towards the truth; seed k of both arms shares noise (pairing).
    """
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    y[:2], y[2:4] = 1, 0  # both classes, at least two of each
    image = rng.normal(size=n)  # image difficulty, shared by every run
    seed_noise = rng.normal(size=(n_seeds, n))
    logit_b = 1.0 * (2 * y - 1) + image + seed_noise
    logit_a = logit_b + 0.5 * rng.normal(size=(n_seeds, n)) + shift * (2 * y - 1)
    a, b = 1 / (1 + np.exp(-logit_a)), 1 / (1 + np.exp(-logit_b))
    if decimals is not None:
        a, b = np.round(a, decimals), np.round(b, decimals)
    return y, a, b


def _aucs(y, scores):
    return [skm.roc_auc_score(y, s) for s in scores]


# ---------------------------------------------------------------------------------------------
# paired_t
# ---------------------------------------------------------------------------------------------


def test_paired_t_matches_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.85, 0.01, 6), rng.normal(0.84, 0.01, 6)
    d = a - b
    r = sig.paired_t(d, level=0.9)
    ref = stats.ttest_rel(a, b)
    ref1 = stats.ttest_1samp(d, 0.0)
    assert r["n"] == 6 and r["df"] == 5
    assert r["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert r["p_value"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert r["p_value"] == pytest.approx(ref1.pvalue, rel=1e-10)
    assert r["mean"] == pytest.approx(d.mean())
    assert r["std"] == pytest.approx(d.std(ddof=1))
    assert r["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(6))
    lo, hi = stats.t.interval(0.9, df=5, loc=d.mean(), scale=stats.sem(d))
    assert r["ci"] == pytest.approx([lo, hi], rel=1e-10)
    assert r["effect_size"] == pytest.approx(d.mean() / d.std(ddof=1))
    json.dumps(r, allow_nan=False)


def test_paired_t_effect_size_ci_inverts_noncentral_t():
    d = np.array([0.02, 0.01, 0.03, 0.015, 0.025])
    r = sig.paired_t(d, level=0.95)
    n, t = len(d), r["t"]
    lo, hi = r["effect_size_ci"]
    assert r["effect_size_ci_method"] == "noncentral_t"
    assert lo < r["effect_size"] < hi
    assert stats.nct.cdf(t, n - 1, lo * math.sqrt(n)) == pytest.approx(0.975, abs=1e-6)
    assert stats.nct.cdf(t, n - 1, hi * math.sqrt(n)) == pytest.approx(0.025, abs=1e-6)


@pytest.mark.parametrize("d", [[0.01], [], [0.02, 0.02, 0.02]])
def test_paired_t_undefined(d):
    r = sig.paired_t(d)
    assert r["n"] == len(d)
    assert r["mean"] == (pytest.approx(np.mean(d)) if d else None)
    for key in ("t", "p_value", "ci", "effect_size", "effect_size_ci"):
        assert r[key] is None
    json.dumps(r, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# holm
# ---------------------------------------------------------------------------------------------


def test_holm_hand_example():
    # sorted 0.01, 0.03, 0.04, 0.20 -> x4, x3, x2, x1 = 0.04, 0.09, 0.08, 0.20 -> cummax
    assert sig.holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert sig.holm([0.01, 0.02, 0.03, 0.04]) == pytest.approx([0.04, 0.06, 0.06, 0.06])
    assert sig.holm([0.5, 0.6]) == [1.0, 1.0]
    assert sig.holm([]) == []


def test_holm_none_skipped_and_properties():
    assert sig.holm([None, 0.01, None, 0.04]) == pytest.approx([None, 0.02, None, 0.04])
    assert sig.holm([None, float("nan")]) == [None, None]
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.random(rng.integers(1, 8)) ** 3
        adj = np.array(sig.holm(p))
        assert np.all(adj >= p) and np.all(adj <= 1)
        i = np.argmin(p)
        assert adj[i] == pytest.approx(min(1.0, len(p) * p[i]))  # Bonferroni for the smallest
        order = np.argsort(p, kind="stable")
        assert np.all(np.diff(adj[order]) >= 0)


def test_holm_matches_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(3).random(7) ** 2
    ref = multitest.multipletests(p, method="holm")[1]
    np.testing.assert_allclose(sig.holm(p), ref, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# hierarchical_bootstrap
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decimals", [None, 1])
def test_bootstrap_matches_loop_reference(decimals):
    y, a, b = _arms(n_seeds=3, n=12, seed=4, decimals=decimals)
    fast = sig.hierarchical_bootstrap(y, a, b, n_resamples=20, seed=7, level=0.9)
    slow = sig._hierarchical_bootstrap_loop(y, a, b, n_resamples=20, seed=7, level=0.9)
    assert fast.keys() == slow.keys()
    for key in ("estimate", "mean", "std", "p_value"):
        assert fast[key] == pytest.approx(slow[key], abs=1e-12)
    np.testing.assert_allclose(fast["ci"], slow["ci"], atol=1e-12)
    assert (fast["n_resamples"], fast["n_seeds"], fast["n_images"]) == (20, 3, 12)
    expected = np.mean(np.subtract(_aucs(y, a), _aucs(y, b)))
    assert fast["estimate"] == pytest.approx(expected, abs=1e-12)
    json.dumps(fast, allow_nan=False)


def test_bootstrap_blocks_match_loop_reference(monkeypatch):
    monkeypatch.setattr(sig, "_DRAW_BUDGET", 40)  # 2 resamples per block of 16 images + 4 seeds
    y, a, b = _arms(n_seeds=4, n=16, seed=11)
    fast = sig.hierarchical_bootstrap(y, a, b, n_resamples=7, seed=1)
    slow = sig._hierarchical_bootstrap_loop(y, a, b, n_resamples=7, seed=1)
    for key in ("estimate", "mean", "std", "p_value"):
        assert fast[key] == pytest.approx(slow[key], abs=1e-12)


def test_bootstrap_identical_arms_and_p_value():
    y, a, _ = _arms(n_seeds=3, n=60, seed=2)
    r = sig.hierarchical_bootstrap(y, a, a, n_resamples=50)
    assert r["estimate"] == 0 and r["ci"] == [0.0, 0.0] and r["p_value"] == 1.0
    assert sig._bootstrap_p(np.full(99, 0.1)) == pytest.approx(2 / 100)  # +1 correction floor


def test_bootstrap_fast_and_deterministic():
    y, a, b = _arms(n_seeds=5, n=500, seed=5, shift=0.3)
    start = time.perf_counter()
    r = sig.hierarchical_bootstrap(y, a, b, n_resamples=1000, seed=3)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, elapsed
    assert r == sig.hierarchical_bootstrap(y, a, b, n_resamples=1000, seed=3)
    assert r["ci"][0] < r["estimate"] < r["ci"][1]


def test_bootstrap_rejects_bad_input():
    y, a, b = _arms(n_seeds=2, n=20)
    with pytest.raises(ValueError):
        sig.hierarchical_bootstrap(y, a, b[:, :10])
    with pytest.raises(ValueError):
        sig.hierarchical_bootstrap(np.ones_like(y), a, b)
    with pytest.raises(ValueError):
        sig.hierarchical_bootstrap(y, a, b, metric="pr_auc")


# ---------------------------------------------------------------------------------------------
# comparison, adjust, headroom
# ---------------------------------------------------------------------------------------------


def _comparison(y, a, b, **kw):
    kw = {"level": 0.95, "n_resamples": 200, "seed": 0, **kw}
    return sig.comparison(y, a, b, _aucs(y, a), _aucs(y, b), **kw)


def test_comparison_identical_arms_not_significant():
    y, a, _ = _arms(n_seeds=4, n=150, seed=6)
    c = _comparison(y, a, a)
    assert c["per_seed_differences"] == [0.0] * 4
    assert c["primary_test"] == "hierarchical_bootstrap"  # paired t undefined: std == 0
    assert c["primary_p_value"] == 1.0
    assert all(d["difference"] == 0 and d["p_value"] == 1.0 for d in c["delong_per_seed"])
    sig.adjust([c], alpha=0.05)
    assert c["verdict"] == sig.NO_DIFFERENCE
    json.dumps(c, allow_nan=False)


def test_comparison_better_arm_higher_and_worse_lower():
    y, a, b = _arms(n_seeds=5, n=300, seed=7, shift=0.8)
    better, worse = _comparison(y, a, b), _comparison(y, b, a)
    assert better["primary_test"] == "paired_t"
    assert better["primary_p_value"] == better["paired_t"]["p_value"]
    assert len(better["delong_per_seed"]) == 5
    expected = np.subtract(_aucs(y, a), _aucs(y, b))
    np.testing.assert_allclose(better["per_seed_differences"], expected)
    sig.adjust([better, worse], alpha=0.05)
    assert better["verdict"] == sig.HIGHER and worse["verdict"] == sig.LOWER
    assert better["p_holm"] >= better["primary_p_value"]
    json.dumps([better, worse], allow_nan=False)


def test_comparison_single_seed_uses_bootstrap():
    y, a, b = _arms(n_seeds=1, n=100, seed=8, shift=0.5)
    c = _comparison(y, a, b)
    assert c["primary_test"] == "hierarchical_bootstrap"
    assert c["primary_p_value"] == c["hierarchical_bootstrap"]["p_value"]


def test_headroom():
    y, full, scarce = _arms(n_seeds=4, n=300, seed=9, shift=0.8)
    kw = {"level": 0.95, "n_resamples": 200, "seed": 0}
    auc_s, auc_f = _aucs(y, scarce), _aucs(y, full)
    h = sig.headroom(y, scarce, full, auc_s, auc_f, min_gap=0.01, **kw)
    assert h["gap"] == pytest.approx(np.mean(np.subtract(auc_f, auc_s)))
    assert h["ci"] == h["paired_t"]["ci"] and h["ci_source"] == "paired_t"
    assert h["sufficient"] is True
    assert sig.headroom(y, scarce, full, auc_s, auc_f, min_gap=0.5, **kw)["sufficient"] is False
    same = sig.headroom(y, scarce, scarce, auc_s, auc_s, min_gap=0.0, **kw)
    assert same["ci_source"] == "hierarchical_bootstrap" and same["sufficient"] is False
    json.dumps(h, allow_nan=False)
