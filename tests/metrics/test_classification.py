"""Tests for cxrjax.metrics.classification: scikit-learn equality, thresholds, bootstrap, DeLong."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize

from cxrjax.metrics import classification as clf

# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _binary(n=600, seed=0, decimals=None, prevalence=0.3):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    s = 1 / (1 + np.exp(-(1.2 * y + rng.normal(size=n) - 0.8)))
    if decimals is not None:
        s = np.round(s, decimals)  # many ties, within and across classes
    return y, s


def _multiclass(n=500, c=4, seed=1, decimals=2):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), y] += 1.0
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    p = np.round(p, decimals)
    return y, p / p.sum(1, keepdims=True)  # rows sum to 1 for sklearn's multi-class AUC


def _multilabel(n=500, c=5, seed=2, decimals=2):
    rng = np.random.default_rng(seed)
    prevalence = np.linspace(0.05, 0.4, c)
    y = (rng.random((n, c)) < prevalence).astype(int)
    s = 1 / (1 + np.exp(-(1.5 * y + rng.normal(size=(n, c)) - 1.5)))
    return y, np.round(s, decimals)


def _specificity(y, pred):
    tn, fp, _, _ = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return tn / (tn + fp)


# ---------------------------------------------------------------------------------------------
# Point metrics == scikit-learn
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("threshold", [0.5, 0.31])
def test_binary_metrics_equal_sklearn(decimals, threshold):
    y, s = _binary(decimals=decimals)
    r = clf.evaluate(y, s, threshold=threshold, n_bootstrap=0)
    pred = (s >= threshold).astype(int)
    assert r["auc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert r["pr_auc"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    assert r["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert r["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert r["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert r["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert r["specificity"] == pytest.approx(_specificity(y, pred))
    assert r["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert (r["threshold"], r["n"], r["n_positive"]) == (threshold, len(y), int(y.sum()))


def test_binary_result_has_stable_json_keys():
    y, s = _binary()
    r = clf.evaluate(y, s, threshold=0.4, n_bootstrap=50, class_names=["normal", "pneumonia"])
    for key in ("auc", "pr_auc", "accuracy", "precision", "recall", "specificity", "f1"):
        assert isinstance(r[key], float)
        lo, hi = r[f"{key}_ci"]
        assert lo <= hi
    for key in ("threshold", "confusion_matrix", "n", "n_positive"):
        assert key in r
    assert r["positive_class"] == "pneumonia" and r["task"] == "binary"
    assert json.loads(json.dumps(r, allow_nan=False)) == r


def test_binary_score_layouts_agree():
    y, s = _binary()
    two_col = np.stack([1 - s, s], axis=1)
    ref = clf.evaluate(y, s, threshold=0.4, n_bootstrap=0)
    assert clf.evaluate(y, two_col, threshold=0.4, n_bootstrap=0) == ref
    assert clf.evaluate(y, s[:, None], threshold=0.4, n_bootstrap=0) == ref


def test_multiclass_metrics_equal_sklearn():
    y, p = _multiclass()
    r = clf.evaluate(y, p, class_names=["a", "b", "c", "d"], n_bootstrap=0)
    pred = p.argmax(1)
    onehot = label_binarize(y, classes=range(4))
    assert r["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert r["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    for avg in ("macro", "micro", "weighted"):
        prec, rec, f1, _ = skm.precision_recall_fscore_support(y, pred, average=avg)
        assert r[avg]["precision"] == pytest.approx(prec)
        assert r[avg]["recall"] == pytest.approx(rec)
        assert r[avg]["f1"] == pytest.approx(f1)
        assert r[avg]["pr_auc"] == pytest.approx(
            skm.average_precision_score(onehot, p, average=avg), abs=1e-12
        )
    for avg in ("macro", "weighted"):
        ovr = skm.roc_auc_score(y, p, multi_class="ovr", average=avg)
        assert r[avg]["auc"] == pytest.approx(ovr, abs=1e-12)
    assert r["micro"]["auc"] == pytest.approx(
        skm.roc_auc_score(onehot, p, average="micro"), abs=1e-12
    )
    cm = skm.confusion_matrix(y, pred)
    prec, rec, f1, support = skm.precision_recall_fscore_support(y, pred, average=None)
    for k, name in enumerate("abcd"):
        row = r["per_class"][name]
        fp = cm[:, k].sum() - cm[k, k]
        tn = cm.sum() - cm[k, :].sum() - cm[:, k].sum() + cm[k, k]
        assert row["specificity"] == pytest.approx(tn / (tn + fp))
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(
            (prec[k], rec[k], f1[k])
        )
        assert row["auc"] == pytest.approx(skm.roc_auc_score(y == k, p[:, k]), abs=1e-12)
        assert row["n_positive"] == support[k]
    assert r["macro"]["specificity"] == pytest.approx(
        np.mean([r["per_class"][n]["specificity"] for n in "abcd"])
    )


def test_multiclass_refuses_a_threshold():
    y, p = _multiclass()
    assert clf.select_threshold(y, p) is None
    with pytest.raises(ValueError, match="argmax"):
        clf.evaluate(y, p, threshold=0.5, n_bootstrap=0)


def test_multilabel_metrics_equal_sklearn():
    y, s = _multilabel()
    thr = [0.3, 0.4, 0.5, 0.45, 0.35]
    names = [f"f{k}" for k in range(5)]
    r = clf.evaluate(y, s, threshold=thr, class_names=names, n_bootstrap=0)
    pred = (s >= np.array(thr)).astype(int)
    assert r["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    for avg in ("macro", "micro", "weighted"):
        prec, rec, f1, _ = skm.precision_recall_fscore_support(y, pred, average=avg)
        assert (r[avg]["precision"], r[avg]["recall"], r[avg]["f1"]) == pytest.approx(
            (prec, rec, f1)
        )
        assert r[avg]["auc"] == pytest.approx(skm.roc_auc_score(y, s, average=avg), abs=1e-12)
        assert r[avg]["pr_auc"] == pytest.approx(
            skm.average_precision_score(y, s, average=avg), abs=1e-12
        )
    mcm = skm.multilabel_confusion_matrix(y, pred)
    for k, name in enumerate(names):
        row = r["per_class"][name]
        assert row["confusion_matrix"] == mcm[k].tolist()
        assert row["threshold"] == thr[k]
        assert row["accuracy"] == pytest.approx(skm.accuracy_score(y[:, k], pred[:, k]))
        assert row["specificity"] == pytest.approx(_specificity(y[:, k], pred[:, k]))
        assert row["pr_auc"] == pytest.approx(skm.average_precision_score(y[:, k], s[:, k]))
    tn, fp = mcm[:, 0, 0].sum(), mcm[:, 0, 1].sum()
    assert r["micro"]["specificity"] == pytest.approx(tn / (tn + fp))
    # threshold as {name: t} is the same as the list
    by_name = clf.evaluate(
        y, s, threshold=dict(zip(names, thr, strict=True)), class_names=names, n_bootstrap=0
    )
    assert by_name == r


def test_multilabel_class_without_positives_is_null_not_nan():
    y, s = _multilabel()
    y[:, 2] = 0
    r = clf.evaluate(y, s, threshold=0.5, n_bootstrap=100)
    assert r["per_class"]["class_2"]["auc"] is None
    assert r["per_class"]["class_2"]["auc_ci"] is None
    keep = [0, 1, 3, 4]
    assert r["macro"]["auc"] == pytest.approx(skm.roc_auc_score(y[:, keep], s[:, keep]))
    json.dumps(r, allow_nan=False)


def test_bad_inputs_fail_loudly():
    y, s = _binary()
    with pytest.raises(ValueError, match="labels but"):
        clf.evaluate(y[:-1], s, n_bootstrap=0)
    with pytest.raises(ValueError, match="NaN"):
        clf.evaluate(y, np.where(y == 1, np.nan, s), n_bootstrap=0)
    with pytest.raises(ValueError, match="0/1"):
        clf.evaluate(y * 2, s, n_bootstrap=0)
    with pytest.raises(ValueError, match="class names"):
        clf.evaluate(y, s, class_names=["only_one"], n_bootstrap=0)


# ---------------------------------------------------------------------------------------------
# Threshold selection == brute force over roc_curve thresholds
# ---------------------------------------------------------------------------------------------


def _brute_force_threshold(y, s, method):
    """Try every roc_curve threshold with plain counts; keep the first (highest) maximum."""
    _, _, candidates = skm.roc_curve(y, s, drop_intermediate=False)
    best_t, best = None, -np.inf
    pos = y == 1
    for t in candidates[np.isfinite(candidates)]:  # decreasing
        pred = s >= t
        tp, fp = np.sum(pred & pos), np.sum(pred & ~pos)
        fn, tn = np.sum(~pred & pos), np.sum(~pred & ~pos)
        if method == "youden":
            crit = tp / (tp + fn) + tn / (tn + fp) - 1
        else:
            crit = 2 * tp / (2 * tp + fp + fn)
        if crit > best + 1e-12:
            best_t, best = t, crit
    return best_t


def test_select_threshold_ties_go_to_the_highest_threshold():
    # Youden J = 0.5 at t = 0.4 (tpr 1/2, fpr 0) and at t = 0.2 (tpr 1, fpr 1/2).
    y, s = np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4])
    assert clf.select_threshold(y, s, "youden") == _brute_force_threshold(y, s, "youden") == 0.4


@pytest.mark.parametrize("method", ["youden", "f1"])
@pytest.mark.parametrize("decimals", [None, 1])
def test_select_threshold_matches_brute_force(method, decimals):
    y, s = _binary(n=300, seed=3, decimals=decimals)
    assert clf.select_threshold(y, s, method) == _brute_force_threshold(y, s, method)


def test_select_threshold_per_class_for_multilabel():
    y, s = _multilabel(n=300)
    got = clf.select_threshold(y, s, "f1")
    assert got == [_brute_force_threshold(y[:, k], s[:, k], "f1") for k in range(5)]


def test_select_threshold_one_class_validation():
    y, s = _binary()
    with pytest.raises(ValueError, match="one class"):
        clf.select_threshold(np.zeros_like(y), s)
    y2, s2 = _multilabel()
    y2[:, 1] = 0
    with pytest.warns(UserWarning, match="class_1"):
        thr = clf.select_threshold(y2, s2, "youden")
    assert thr[1] == 0.5 and thr[0] != 0.5


# ---------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------


def _materialised(counts, *arrays):
    idx = np.repeat(np.arange(len(counts)), counts.astype(int))
    return [a[idx] for a in arrays]


@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel"])
def test_vectorised_resample_equals_sklearn_on_the_materialised_resample(kind):
    """The engine's O(N) weighted metrics == evaluate() (sklearn) on the repeated rows."""
    y, s = {"binary": _binary(n=300, decimals=1), "multiclass": _multiclass(n=300)}.get(
        kind, _multilabel(n=300)
    )
    threshold = None if kind == "multiclass" else 0.4
    task = clf._prepare(y, s)
    pred, _ = clf._predictions(task, threshold)
    wt = clf._resample_counts(np.random.default_rng(0), clf._strata(task), task.n, 3)
    wt = np.concatenate([np.ones((task.n, 1)), wt], axis=1)  # column 0: the original set
    boot = clf._Resampled(task, pred)(wt)
    for b in range(wt.shape[1]):
        ref = clf.evaluate(*_materialised(wt[:, b], y, s), threshold=threshold, n_bootstrap=0)
        for key, values in boot.items():
            if key.startswith("per_class/"):
                metric = key.split("/")[1]
                want = [ref["per_class"][n][metric] for n in task.names]
                got = values[b]
            elif "/" in key:
                group, metric = key.split("/")
                want, got = ref[group][metric], values[b]
            else:
                want, got = ref[key], values[b]
            want = np.array(want, dtype=float)  # None (undefined) -> nan
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=key)


def test_bootstrap_ci_contains_estimate_and_shrinks_with_n():
    widths = {}
    for n in (400, 6400):
        y, s = _binary(n=n, seed=5)
        r = clf.evaluate(y, s, threshold=0.4, n_bootstrap=400, seed=0)
        for key in ("auc", "pr_auc", "accuracy", "precision", "recall", "specificity", "f1"):
            lo, hi = r[f"{key}_ci"]
            assert lo <= r[key] <= hi, key
        widths[n] = r["auc_ci"][1] - r["auc_ci"][0]
    # sqrt(16) = 4x narrower in theory; allow slack for resampling noise
    assert widths[6400] < 0.4 * widths[400]


def test_bootstrap_is_seeded_and_stratified():
    y, s = _binary(n=200, prevalence=0.03, seed=6)  # ~6 positives: unstratified would lose them
    a = clf.evaluate(y, s, threshold=0.5, n_bootstrap=300, seed=1)
    assert a == clf.evaluate(y, s, threshold=0.5, n_bootstrap=300, seed=1)
    assert a["auc_ci"] != clf.evaluate(y, s, threshold=0.5, n_bootstrap=300, seed=2)["auc_ci"]
    task = clf._prepare(y, s)
    wt = clf._resample_counts(np.random.default_rng(0), clf._strata(task), task.n, 50)
    np.testing.assert_array_equal(wt.sum(0), task.n)
    np.testing.assert_array_equal(wt[y == 1].sum(0), y.sum())
    assert a["bootstrap"] == {"n_resamples": 300, "seed": 1, "level": 0.95, "stratified": True}


def test_bootstrap_handles_single_class_sets_and_resamples():
    y, s = _binary(n=100)
    r = clf.evaluate(np.zeros_like(y), s, threshold=0.5, n_bootstrap=100)
    assert r["auc"] is None and r["auc_ci"] is None and r["pr_auc_ci"] is None
    assert r["specificity_ci"] is not None
    # multi-label resamples images as one stratum: a one-positive finding is often lost
    ym, sm = _multilabel(n=60)
    ym[:, 0] = 0
    ym[7, 0] = 1
    rm = clf.evaluate(ym, sm, threshold=0.5, n_bootstrap=200)
    lo, hi = rm["per_class"]["class_0"]["auc_ci"]
    assert 0 <= lo <= hi <= 1
    assert rm["bootstrap"]["stratified"] is False
    json.dumps(rm, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# Aggregation across seeds
# ---------------------------------------------------------------------------------------------


def test_aggregate_seeds_t_interval():
    runs = [
        {"auc": 0.91, "macro": {"f1": 0.70}, "auc_ci": [0.8, 0.9], "task": "binary"},
        {"auc": 0.93, "macro": {"f1": 0.74}, "auc_ci": [0.8, 0.9], "task": "binary"},
        {"auc": 0.92, "macro": {"f1": None}, "auc_ci": [0.8, 0.9], "task": "binary"},
    ]
    agg = clf.aggregate_seeds(runs)
    x = np.array([0.91, 0.93, 0.92])
    lo, hi = stats.t.interval(0.95, df=2, loc=x.mean(), scale=stats.sem(x))
    assert agg["auc"]["mean"] == pytest.approx(x.mean())
    assert agg["auc"]["std"] == pytest.approx(x.std(ddof=1))
    assert agg["auc"]["ci"] == pytest.approx([lo, hi])
    assert agg["macro"]["f1"]["n"] == 2  # None (undefined) left out
    assert "auc_ci" not in agg and "task" not in agg
    single = clf.aggregate_seeds(runs[:1])
    assert single["auc"]["std"] is None and single["auc"]["ci"] is None


# ---------------------------------------------------------------------------------------------
# DeLong
# ---------------------------------------------------------------------------------------------


def _brute_force_delong(y, scores):
    """DeLong et al. (1988) structural components, straight from the definitions, O(m n)."""
    v10, v01, aucs = [], [], []
    for s in scores:
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])  # [m, n]
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
        aucs.append(psi.mean())
    m, n = len(v10[0]), len(v01[0])
    return np.array(aucs), np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n


@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_delong_equals_sklearn_auc_and_brute_force_covariance(decimals):
    y, a = _binary(n=250, seed=7, decimals=decimals)
    rng = np.random.default_rng(8)
    b = np.round(0.6 * a + 0.4 * rng.random(len(a)), 1 if decimals is not None else 12)
    aucs, cov = clf.delong_covariance(y, [a, b])
    ref_aucs, ref_cov = _brute_force_delong(y, [a, b])
    assert aucs == pytest.approx([skm.roc_auc_score(y, a), skm.roc_auc_score(y, b)], abs=1e-12)
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10, atol=1e-15)
    t = clf.delong_test(y, a, b)
    var_d = ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1]
    assert t["variance"] == pytest.approx(var_d, rel=1e-9)
    assert t["z"] == pytest.approx((ref_aucs[0] - ref_aucs[1]) / math.sqrt(var_d), rel=1e-9)


# pROC's aSAH data (Turck et al. 2010, Intensive Care Med 36:107-115; 113 patients), read from
# data/aSAH.RData of github.com/xrobin/pROC @ ee2877e. POOR = outcome == "Poor"; WFNS is the
# integer code of the ordered factor (1-5), which is what pROC ranks.
_ASAH_POOR = [
    0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0,
    0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0,
]  # fmt: skip
_ASAH_WFNS = [
    1, 1, 1, 1, 3, 2, 5, 4, 1, 2, 5, 2, 5, 5, 1, 2, 5, 2, 2, 5, 2, 1, 1, 1, 1, 2, 1, 2, 1, 1, 3,
    4, 2, 1, 4, 5, 4, 1, 4, 2, 5, 5, 1, 1, 2, 4, 1, 1, 2, 5, 5, 2, 1, 2, 5, 1, 2, 2, 2, 1, 5, 1,
    1, 2, 5, 2, 1, 4, 5, 2, 4, 4, 1, 4, 1, 2, 1, 4, 2, 1, 2, 3, 2, 4, 2, 1, 4, 5, 1, 1, 5, 4, 2,
    2, 1, 1, 1, 3, 1, 2, 5, 2, 2, 5, 5, 5, 2, 4, 4, 5, 1, 1, 1,
]  # fmt: skip
_ASAH_S100B = [
    0.13, 0.14, 0.1, 0.04, 0.13, 0.1, 0.47, 0.16, 0.18, 0.1, 0.12, 0.1, 0.44, 0.71, 0.04, 0.08,
    0.49, 0.04, 0.07, 0.33, 0.09, 0.09, 0.07, 0.11, 0.07, 0.17, 0.07, 0.11, 0.13, 0.19, 0.05,
    0.16, 0.41, 0.14, 0.34, 0.35, 0.48, 0.09, 0.96, 0.25, 0.5, 0.46, 0.16, 0.07, 0.43, 0.45,
    0.11, 0.08, 0.09, 0.86, 0.52, 0.08, 0.06, 0.13, 2.07, 0.1, 0.14, 0.15, 0.07, 0.06, 0.77,
    0.05, 0.09, 0.3, 0.03, 0.09, 0.04, 0.23, 0.7, 0.09, 0.27, 0.71, 0.08, 0.26, 0.08, 0.16,
    0.09, 0.13, 0.1, 0.08, 0.11, 0.33, 0.11, 0.28, 0.07, 0.1, 0.32, 0.22, 0.07, 0.05, 0.24,
    0.38, 0.1, 0.15, 0.08, 0.14, 0.1, 0.07, 0.04, 0.19, 0.56, 0.14, 0.58, 0.32, 0.82, 0.74,
    0.15, 0.47, 0.17, 0.44, 0.15, 0.5, 0.48,
]  # fmt: skip
_ASAH_NDKA = [
    3.01, 8.54, 8.09, 10.42, 17.4, 12.75, 6.0, 13.2, 15.54, 6.01, 15.96, 17.86, 5.18, 8.9,
    13.41, 20.75, 11.6, 16.11, 32.37, 54.82, 32.41, 49.94, 40.34, 9.47, 6.29, 12.53, 6.54, 6.3,
    80.3, 12.8, 9.8, 9.81, 9.85, 18.21, 5.03, 14.04, 21.93, 8.02, 7.42, 8.38, 6.59, 9.63, 13.12,
    7.96, 14.34, 41.43, 7.63, 7.06, 12.59, 13.56, 3.87, 9.44, 7.66, 12.98, 419.19, 27.19, 22.27,
    9.95, 21.22, 11.73, 10.4, 58.83, 6.39, 11.09, 12.22, 13.67, 17.21, 22.63, 12.9, 9.7, 21.57,
    8.23, 72.57, 15.54, 10.51, 10.6, 14.57, 5.19, 9.63, 4.61, 21.48, 17.3, 12.71, 9.44, 11.07,
    19.46, 10.83, 5.37, 11.97, 7.75, 9.83, 10.55, 28.49, 8.53, 12.57, 12.9, 46.83, 11.68, 12.67,
    9.01, 9.57, 34.06, 11.72, 14.26, 47.61, 11.67, 24.58, 10.33, 13.87, 15.89, 22.43, 6.79,
    13.45,
]  # fmt: skip


def test_delong_reproduces_proc_on_asah():
    """Expected values are pROC's own test suite (tests/testthat/test-roc.test.R, test-var.R,
    test-cov.R, test-auc.R, test-ci.auc.R @ ee2877e), e.g. roc.test(wfns, s100b): Z = 2.209,
    p = 0.02718 (the documented s100b-vs-wfns example with the sign flipped)."""
    y = np.array(_ASAH_POOR)
    wfns, ndka, s100b = (np.array(v, float) for v in (_ASAH_WFNS, _ASAH_NDKA, _ASAH_S100B))
    assert (len(y), y.sum()) == (113, 41)
    aucs, cov = clf.delong_covariance(y, [wfns, ndka, s100b])
    np.testing.assert_allclose(aucs[:2], [0.823678861788618, 0.611957994579946], rtol=1e-12)
    np.testing.assert_allclose(
        np.diag(cov), [0.00146991470882363, 0.0031908105493913, 0.00266868245717244], rtol=1e-12
    )
    np.testing.assert_allclose(
        [cov[0, 1], cov[1, 2], cov[2, 0]],
        [-0.000532967856762438, -0.000756164938056579, 0.00119615567376754],
        rtol=1e-12,
    )
    expected = [  # (a, b, Z, p, CI of the difference a - b)
        (wfns, s100b, 2.20898359144091, 0.0271757822291882, 0.0104061769564846, 0.174214419249478),
        (wfns, ndka, 2.79777591868904, 0.00514557970691098, 0.0634011709339876, 0.360040563483357),
        (ndka, s100b, -1.39077002573558, 0.164295175223054, -0.287691744634191, 0.0488706064228094),
    ]  # fmt: skip
    for a, b, z, p, *ci in expected:
        t = clf.delong_test(y, a, b)
        assert t["z"] == pytest.approx(z, rel=1e-12)
        assert t["p_value"] == pytest.approx(p, rel=1e-11)
        assert t["ci"] == pytest.approx(ci, rel=1e-12)
        assert t["difference"] == pytest.approx(t["auc1"] - t["auc2"])
    single = clf.delong_auc_ci(y, ndka)  # pROC ci.auc(r.ndka)
    assert single["ci"] == pytest.approx([0.501244999271703, 0.722670989888189], rel=1e-12)
    assert single["variance"] == pytest.approx(0.0031908105493913, rel=1e-12)


def test_delong_identical_models_and_null_p_values():
    y, s = _binary(n=200, seed=9, decimals=2)
    same = clf.delong_test(y, s, s.copy())
    assert (same["z"], same["p_value"], same["variance"]) == (0.0, 1.0, 0.0)
    # Two models with the same true AUC, independent noise: p-values should be ~Uniform(0, 1).
    rng = np.random.default_rng(10)
    p_values = []
    for _ in range(300):
        y = rng.integers(0, 2, 150)
        a, b = y + rng.normal(size=150), y + rng.normal(size=150)
        p_values.append(clf.delong_test(y, a, b)["p_value"])
    p_values = np.array(p_values)
    assert stats.kstest(p_values, "uniform").pvalue > 0.001
    assert 0.01 < np.mean(p_values < 0.05) < 0.11
    assert np.median(p_values) > 0.3


def test_delong_needs_both_classes():
    with pytest.raises(ValueError, match="positives and negatives"):
        clf.delong_test(np.array([1, 1, 0]), np.array([0.2, 0.3, 0.1]), np.array([0.1, 0.2, 0.3]))


def test_no_runtime_warnings_on_degenerate_bootstrap():
    y, s = _multilabel(n=40)
    y[:, 3] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clf.evaluate(y, s, threshold=0.5, n_bootstrap=50)
