"""Significance of differences between classifier arms trained over paired seeds.

An experiment trains each arm (e.g. real + synthetic) and a reference arm (e.g. real only) with
seeds k = 1..S, where seed k of both arms shares data order and initialisation, and scores all of
them on the same held-out test images. Two sources of variance matter: training (seeds) and the
finite test set (images). This module answers "is arm A better than B?" with

  paired_t                the primary test: Student-t on the per-seed differences d_k, which
                          carries the seed variance and (through each d_k) the test-set noise;
  hierarchical_bootstrap  resamples seeds and test images together (paired), for when there are
                          too few seeds for a t-test, and as a check on it;
  delong_per_seed         DeLong's test of each seed pair, a secondary figure (test-set variance
                          only, so it overstates significance when seed variance dominates);
  holm / adjust           Holm-Bonferroni over the family of arm-vs-reference comparisons;
  headroom                whether real_full beats real_scarce by enough for augmentation of the
                          scarce arm to have something to recover.

Pure host-side numpy/scipy; every result is a plain JSON-ready dict (None where undefined).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from scipy import optimize, stats
from sklearn import metrics as skm

from cxrjax import fileio
from cxrjax.metrics import classification

HIGHER = "higher"
LOWER = "lower"
NO_DIFFERENCE = "no detectable difference"

# Index draws per block of resamples: elements of the [B, N] index arrays held at once (~32 MiB
# as int64), so memory stays flat for large test sets.
_DRAW_BUDGET = 1 << 22


# ---------------------------------------------------------------------------------------------
# Paired t-test on per-seed differences
# ---------------------------------------------------------------------------------------------


def _finite_1d(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contain NaN or inf")
    return a


def _effect_size_ci(t: float, n: int, level: float) -> tuple[list[float], str]:
    """CI for Cohen's d_z by inverting the noncentral t: t * sqrt(n) ~ nct(n - 1, d_z sqrt(n)).

    Exact for normal differences. Falls back to the normal approximation
    d_z +- z * sqrt(1/n + d_z^2 / (2n)) if the root search fails (extreme t, numerical trouble).
    """
    df, root_n, alpha = n - 1, math.sqrt(n), 1 - level

    def ncp_for(prob: float) -> float:
        # nct.cdf(t; ncp) decreases in ncp: find ncp where it equals prob.
        f = lambda ncp: stats.nct.cdf(t, df, ncp) - prob
        width = max(1.0, abs(t))
        lo, hi = t - width, t + width
        for _ in range(60):
            if f(lo) > 0 and f(hi) < 0:
                return optimize.brentq(f, lo, hi, xtol=1e-10)
            lo, hi = lo - width, hi + width
            width *= 2
        raise RuntimeError("no bracket")

    try:
        with np.errstate(all="ignore"):
            ncp_lo, ncp_hi = ncp_for(1 - alpha / 2), ncp_for(alpha / 2)
        if not (math.isfinite(ncp_lo) and math.isfinite(ncp_hi)):
            raise RuntimeError("non-finite bound")
        return [ncp_lo / root_n, ncp_hi / root_n], "noncentral_t"
    except (RuntimeError, ValueError):
        d = t / root_n
        half = float(stats.norm.ppf(0.5 + level / 2)) * math.sqrt(1 / n + d * d / (2 * n))
        return [d - half, d + half], "normal_approx"


def paired_t(differences: Any, level: float = 0.95) -> dict:
    """Paired t-test of per-seed differences d_k = metric(A, k) - metric(B, k) against 0.

    Pairing by seed removes the seed-to-seed variation both arms share. Returns n, mean, std
    (ddof=1), se, df, t, two-sided p_value, Student-t ci at `level`, Cohen's d_z (`effect_size`
    = mean / std) and its `effect_size_ci` (noncentral-t inversion; `effect_size_ci_method` says
    if the normal approximation was used instead). With n < 2 or std == 0 the test is undefined:
    t, p_value, ci and effect sizes are None.
    """
    d = _finite_1d(differences, "differences")
    n = int(d.size)
    out: dict[str, Any] = {
        "n": n,
        "mean": float(d.mean()) if n else None,
        "std": None,
        "se": None,
        "df": None,
        "t": None,
        "p_value": None,
        "ci": None,
        "level": float(level),
        "effect_size": None,
        "effect_size_ci": None,
        "effect_size_ci_method": None,
    }
    if n < 2:
        return out
    mean, std = float(d.mean()), float(d.std(ddof=1))
    se = std / math.sqrt(n)
    out.update(std=std, se=se, df=n - 1)
    if std == 0 or not se > 0:
        return out
    t = mean / se
    half = float(stats.t.ppf(0.5 + level / 2, df=n - 1)) * se
    es_ci, method = _effect_size_ci(t, n, level)
    out.update(
        t=t,
        p_value=float(2 * stats.t.sf(abs(t), df=n - 1)),
        ci=[mean - half, mean + half],
        effect_size=mean / std,
        effect_size_ci=es_ci,
        effect_size_ci_method=method,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Holm-Bonferroni
# ---------------------------------------------------------------------------------------------


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni step-down adjusted p-values, in the input order.

    Controls the family-wise error over several arm-vs-reference comparisons, uniformly more
    powerful than Bonferroni. The i-th smallest of m p-values becomes
    max_{j <= i} min(1, (m - j + 1) p_(j)). None (or NaN) entries are not tests: skipped, not
    counted in m, and returned as None.
    """
    vals = [None if p is None or not math.isfinite(float(p)) else float(p) for p in p_values]
    idx = [i for i, p in enumerate(vals) if p is not None]
    out: list[float | None] = [None] * len(vals)
    if not idx:
        return out
    p = np.array([vals[i] for i in idx])
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    for rank, j in enumerate(order):
        out[idx[j]] = float(adjusted[rank])
    return out


# ---------------------------------------------------------------------------------------------
# Hierarchical (seed x image) bootstrap
# ---------------------------------------------------------------------------------------------


def _prepare(y_true: Any, scores_a: Any, scores_b: Any) -> tuple[np.ndarray, ...]:
    y = np.asarray(y_true)
    if y.ndim != 1 or (y.size and not np.isin(y, (0, 1)).all()):
        raise ValueError("y_true must be binary 0/1 labels [N]")
    y = y.astype(bool)
    a = np.atleast_2d(np.asarray(scores_a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(scores_b, dtype=np.float64))
    if a.ndim != 2 or a.shape != b.shape or a.shape[1] != y.shape[0]:
        raise ValueError(
            f"scores must both be [S, N] with N = {y.shape[0]} labels, got {a.shape}, {b.shape}"
        )
    if a.shape[0] < 1:
        raise ValueError("need at least one seed")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("scores contain NaN or inf")
    if y.all() or not y.any():
        raise ValueError("AUC needs both classes in y_true")
    return y, a, b


def _draws(
    rng: np.random.Generator, y: np.ndarray, n_seeds: int, n_resamples: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Blocks of (seed_idx [B, S], pos_idx [B, m], neg_idx [B, n]) drawn with replacement.

    Images are drawn within each class (every resample keeps m positives and n negatives, so
    its AUC is defined); seeds independently of images. One draw serves both arms and all seeds.
    """
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    block = max(1, _DRAW_BUDGET // (len(y) + n_seeds))
    for start in range(0, n_resamples, block):
        b = min(block, n_resamples - start)
        seed_idx = rng.integers(0, n_seeds, size=(b, n_seeds))
        pos_idx = pos[rng.integers(0, len(pos), size=(b, len(pos)))]
        neg_idx = neg[rng.integers(0, len(neg), size=(b, len(neg)))]
        yield seed_idx, pos_idx, neg_idx


class _SeedAUC:
    """AUC of one score vector on resampled images in O(N) per resample (Mann-Whitney).

    Negatives are sorted once; each positive image knows how many negatives score strictly
    below (lo) and at most (hi) it. For a resample, the prefix sums of drawn-negative counts in
    score order give each drawn positive its win count (prefix[lo] + prefix[hi]) / 2, i.e. ties
    count one half, as in sklearn's roc_auc_score.
    """

    def __init__(self, s: np.ndarray, y: np.ndarray):
        s_neg = s[~y]
        self.order = np.argsort(s_neg, kind="stable")  # negatives (in class order) by score
        s_sorted = s_neg[self.order]
        self.lo = np.searchsorted(s_sorted, s, side="left")  # used for positive images only
        self.hi = np.searchsorted(s_sorted, s, side="right")

    def __call__(self, pos_idx: np.ndarray, neg_counts: np.ndarray) -> np.ndarray:
        """AUC [B] for drawn positive images pos_idx [B, m] and negative counts [B, n]."""
        b, m = pos_idx.shape
        prefix = np.zeros((b, neg_counts.shape[1] + 1))
        np.cumsum(neg_counts[:, self.order], axis=1, out=prefix[:, 1:])
        wins = np.take_along_axis(prefix, self.lo[pos_idx], axis=1)
        wins += np.take_along_axis(prefix, self.hi[pos_idx], axis=1)
        return wins.sum(axis=1) / (2.0 * m * prefix[:, -1])


def _neg_counts(neg_idx: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Multiplicity [B, n] of each negative image (in class order) in each resample."""
    neg_pos = np.cumsum(~y) - 1  # image index -> position among negatives
    b, n = neg_idx.shape[0], int((~y).sum())
    flat = neg_pos[neg_idx] + (np.arange(b) * n)[:, None]
    return np.bincount(flat.ravel(), minlength=b * n).reshape(b, n)


def _bootstrap_p(diffs: np.ndarray) -> float:
    """Two-sided bootstrap p: 2 min(P(diff <= 0), P(diff >= 0)), each as (1 + count) / (B + 1).

    The +1 counts the observed data as one of the resamples, so p is never 0 (its floor is
    2 / (B + 1)) and stays valid for a finite number of resamples; clipped to [0, 1].
    """
    b = diffs.size
    le = (1 + np.count_nonzero(diffs <= 0)) / (b + 1)
    ge = (1 + np.count_nonzero(diffs >= 0)) / (b + 1)
    return float(min(1.0, 2 * min(le, ge)))


def _summary(estimate: float, diffs: np.ndarray, level: float, n_seeds: int, n_images: int) -> dict:
    lo, hi = np.percentile(diffs, [50 * (1 - level), 50 * (1 + level)])
    return {
        "estimate": float(estimate),
        "mean": float(diffs.mean()),
        "std": float(diffs.std(ddof=1)) if diffs.size > 1 else None,
        "ci": [float(lo), float(hi)],
        "p_value": _bootstrap_p(diffs),
        "level": float(level),
        "n_resamples": int(diffs.size),
        "n_seeds": int(n_seeds),
        "n_images": int(n_images),
    }


def _check_metric(metric: str, n_resamples: int) -> None:
    if metric != "auc":
        raise ValueError(f"only metric='auc' is supported, got {metric!r}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")


def hierarchical_bootstrap(
    y_true: Any,
    scores_a: Any,
    scores_b: Any,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    metric: str = "auc",
) -> dict:
    """Paired two-level bootstrap of mean_seeds[AUC(A_s) - AUC(B_s)] over seeds and images.

    scores_a, scores_b: [S, N] positive-class scores, row s from seed s (paired across arms);
    y_true: binary [N]. Each resample draws S seeds with replacement and, independently, N test
    images with replacement within each class; both arms and all drawn seeds see the same
    images, so the interval carries seed and test-set variance without the shared part. Returns
    `estimate` (on the original data), the resamples' `mean`, `std`, percentile `ci`, two-sided
    `p_value` (see `_bootstrap_p`), `n_resamples`, `n_seeds`, `n_images`.
    """
    return _bootstrap(
        _fast_differences, y_true, scores_a, scores_b, n_resamples, seed, level, metric
    )


def _hierarchical_bootstrap_loop(y_true: Any, scores_a: Any, scores_b: Any, **options) -> dict:
    """Reference for tests: the same draws as `hierarchical_bootstrap`, with loops and sklearn."""
    options = {"n_resamples": 1000, "seed": 0, "level": 0.95, "metric": "auc", **options}
    return _bootstrap(_loop_differences, y_true, scores_a, scores_b, **options)


def _bootstrap(differences_fn, y_true, scores_a, scores_b, n_resamples, seed, level, metric):
    """Checks, draws and summary shared by both implementations; `differences_fn(y, a, b,
    draws) -> (estimate, per-resample differences [B])` is what they differ in."""
    _check_metric(metric, n_resamples)
    y, a, b = _prepare(y_true, scores_a, scores_b)
    draws = _draws(np.random.default_rng(seed), y, a.shape[0], n_resamples)
    estimate, diffs = differences_fn(y, a, b, draws)
    return _summary(estimate, diffs, level, a.shape[0], len(y))


def _fast_differences(y, a, b, draws):
    pairs = [(_SeedAUC(a[s], y), _SeedAUC(b[s], y)) for s in range(a.shape[0])]
    pos_all, ones = np.flatnonzero(y)[None], np.ones((1, int((~y).sum())))
    estimate = np.mean([fa(pos_all, ones)[0] - fb(pos_all, ones)[0] for fa, fb in pairs])
    parts = []
    for seed_idx, pos_idx, neg_idx in draws:
        # AUC difference of every seed on this block's images [B, S], then the drawn seeds' mean.
        counts = _neg_counts(neg_idx, y)
        d = np.stack([fa(pos_idx, counts) - fb(pos_idx, counts) for fa, fb in pairs], axis=1)
        parts.append(np.take_along_axis(d, seed_idx, axis=1).mean(axis=1))
    return estimate, np.concatenate(parts)


def _loop_differences(y, a, b, draws):
    estimate = np.mean(
        [skm.roc_auc_score(y, a[s]) - skm.roc_auc_score(y, b[s]) for s in range(a.shape[0])]
    )
    diffs = []
    for seed_idx, pos_idx, neg_idx in draws:
        for r in range(seed_idx.shape[0]):
            img = np.concatenate([pos_idx[r], neg_idx[r]])
            yr = y[img]
            per_seed = [
                skm.roc_auc_score(yr, a[s, img]) - skm.roc_auc_score(yr, b[s, img])
                for s in seed_idx[r]
            ]
            diffs.append(np.mean(per_seed))
    return estimate, np.asarray(diffs)


# ---------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------


def _per_seed_aucs(auc_a: Any, auc_b: Any, n_seeds: int) -> np.ndarray:
    a, b = _finite_1d(auc_a, "auc_a"), _finite_1d(auc_b, "auc_b")
    if a.shape != b.shape or a.size != n_seeds:
        raise ValueError(
            f"auc_a {a.shape} and auc_b {b.shape} must hold one AUC per seed ({n_seeds})"
        )
    return a - b


def _delong(y: np.ndarray, a: np.ndarray, b: np.ndarray, level: float) -> dict:
    try:
        r = classification.delong_test(y.astype(np.int64), a, b, level)
    except ValueError:  # fewer than two positives or negatives
        return {"difference": None, "std_error": None, "p_value": None}
    return {"difference": r["difference"], "std_error": r["std_error"], "p_value": r["p_value"]}


def comparison(
    y_true: Any,
    scores_a: Any,
    scores_b: Any,
    auc_a: Any,
    auc_b: Any,
    *,
    level: float = 0.95,
    **bootstrap_options: Any,
) -> dict:
    """Everything to judge arm A against reference arm B, as one JSON-ready block.

    scores_*: [S, N] test scores per seed (paired by row); auc_*: the S per-seed AUCs already
    reported for each run. The primary test is the paired t on the per-seed AUC differences
    (seeds are the experimental unit); when it is undefined (one seed, or identical
    differences) the hierarchical bootstrap p-value stands in, and `primary_test` says which.
    `bootstrap_options` (n_resamples, seed) go to `hierarchical_bootstrap`.
    """
    y, a, b = _prepare(y_true, scores_a, scores_b)
    diffs = _per_seed_aucs(auc_a, auc_b, a.shape[0])
    t = paired_t(diffs, level)
    boot = hierarchical_bootstrap(y, a, b, level=level, **bootstrap_options)
    use_t = t["n"] >= 2 and t["p_value"] is not None
    return fileio.json_safe(
        {
            "per_seed_differences": diffs.tolist(),
            "mean_difference": float(diffs.mean()),
            "paired_t": t,
            "hierarchical_bootstrap": boot,
            "delong_per_seed": [_delong(y, a[k], b[k], level) for k in range(a.shape[0])],
            "primary_test": "paired_t" if use_t else "hierarchical_bootstrap",
            "primary_p_value": t["p_value"] if use_t else boot["p_value"],
            "level": float(level),
        }
    )


def adjust(comparisons: list[dict], alpha: float) -> None:
    """Holm-adjust the comparisons' primary p-values in place and give each a verdict.

    Sets `p_holm` and `verdict`: "higher" / "lower" when p_holm < alpha (sign of the mean
    per-seed difference), else "no detectable difference" (not evidence of equality).
    """
    adjusted = holm([c.get("primary_p_value") for c in comparisons])
    for c, p in zip(comparisons, adjusted, strict=True):
        mean = c.get("mean_difference")
        if mean is None:
            mean = float(np.mean(c["per_seed_differences"]))
        c["p_holm"] = p
        c["alpha"] = float(alpha)
        if p is not None and p < alpha and mean > 0:
            c["verdict"] = HIGHER
        elif p is not None and p < alpha and mean < 0:
            c["verdict"] = LOWER
        else:
            c["verdict"] = NO_DIFFERENCE


def headroom(
    y_true: Any,
    scores_scarce: Any,
    scores_full: Any,
    auc_scarce: Any,
    auc_full: Any,
    *,
    min_gap: float,
    **options: Any,
) -> dict:
    """Is there room for augmentation to help? real_full - real_scarce, per seed.

    If training on all real data is not clearly better than on the scarce subset, no
    augmentation of the scarce arm can show a gain, and a null result says nothing.
    `sufficient` requires the mean gap >= `min_gap` and the CI (paired t; hierarchical
    bootstrap when the t is undefined) to exclude 0 from below. `options`: `comparison`'s
    (level, n_resamples, seed).
    """
    block = comparison(y_true, scores_full, scores_scarce, auc_full, auc_scarce, **options)
    gap = block["mean_difference"]
    ci, source = block["paired_t"]["ci"], "paired_t"
    if ci is None:
        ci, source = block["hierarchical_bootstrap"]["ci"], "hierarchical_bootstrap"
    block.update(
        gap=gap,
        ci=ci,
        ci_source=source,
        min_gap=float(min_gap),
        sufficient=bool(ci is not None and gap >= min_gap and ci[0] > 0),
    )
    return block
