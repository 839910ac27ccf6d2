"""Classification metrics for CXR models: one implementation for every evaluate/report path.

Host-side numpy (predictions are small). Point metrics come from scikit-learn; what no library
offers is written here: threshold selection, a vectorised stratified bootstrap, DeLong's test
(Sun & Xu's midrank algorithm) and aggregation across seeds.

Inputs, for every function:
  y_true  int labels [N] (binary or multi-class) or 0/1 multi-hot [N, C] (multi-label).
  scores  probabilities [N, C] (softmax or sigmoid outputs). Binary also accepts [N] or [N, 1];
          with [N, 2] the score is class 1's probability.

Decisions: binary and multi-label predict positive when `score >= threshold` (threshold per
class for multi-label, chosen on validation with `select_threshold`); multi-class (> 2 classes)
predicts the argmax and takes no threshold, because one-vs-rest thresholds can give a row zero or
several labels.

Results are plain dicts (Python floats, ints, lists; an undefined metric, such as the AUC of a
single-class set, is None) so they go straight into JSON:
  binary      {auc, pr_auc, accuracy, precision, recall, specificity, f1, threshold,
               confusion_matrix [[tn, fp], [fn, tp]], n, n_positive, ...} for the positive class.
  multi-class {accuracy, confusion_matrix [C, C], per_class: {name: {...}}, macro, micro,
               weighted, ...}
  multi-label {subset_accuracy, per_class: {finding: {... as binary}}, macro, micro, weighted}
With bootstrap on, every metric `m` that has one gets `m_ci: [lo, hi]` beside it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from scipy import sparse, stats
from sklearn import metrics as skm

from cxrjax import fileio

BINARY = "binary"
MULTICLASS = "multiclass"
MULTILABEL = "multilabel"

ThresholdMethod = Literal["youden", "f1"]

# Metrics computed from the 2x2 counts of one class (binary, or one-vs-rest per class).
COUNT_METRICS = ("accuracy", "precision", "recall", "specificity", "f1")
RANK_METRICS = ("auc", "pr_auc")

# Bootstrap block size: elements of the [N * columns, resamples] intermediates held at once
# (~32 MiB per float64 array), so memory stays flat for any N and number of resamples.
_BOOTSTRAP_BUDGET = 1 << 22


# ---------------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Task:
    """Validated predictions in one-vs-rest column form, shared by point metrics and bootstrap."""

    kind: str
    y: np.ndarray  # [N, K] bool; K = 1 for binary (the positive class)
    scores: np.ndarray  # [N, K] float64
    names: list[str]  # K column names (binary: the positive class)
    labels: np.ndarray | None  # [N] int class ids for multi-class, else None

    @property
    def n(self) -> int:
        return self.y.shape[0]


def positive_scores(scores: Any) -> np.ndarray:
    """Class-1 probability [N] from binary scores given as [N], [N, 1] or [N, 2]."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] in (1, 2):
        s = s[:, -1]
    if s.ndim != 1:
        raise ValueError(f"binary scores must be [N], [N, 1] or [N, 2], got shape {s.shape}")
    return s


def _int_labels(y: np.ndarray, what: str) -> np.ndarray:
    if y.size and not np.array_equal(y, np.round(y)):
        raise ValueError(f"{what} must hold integer labels, got {y.dtype} values like {y.flat[0]}")
    return y.astype(np.int64)


def _prepare(y_true: Any, scores: Any, class_names: Sequence[str] | None = None) -> _Task:
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    if y.ndim == 2:
        if s.shape != y.shape:
            raise ValueError(f"multi-label y_true {y.shape} and scores {s.shape} differ in shape")
        y = _int_labels(y, "y_true")
        if np.any((y != 0) & (y != 1)):
            raise ValueError("multi-label y_true must be 0/1 multi-hot")
        names = _names(class_names, y.shape[1], default="class")
        return _Task(MULTILABEL, y.astype(bool), s, names, None)
    if y.ndim != 1:
        raise ValueError(f"y_true must be [N] labels or [N, C] multi-hot, got shape {y.shape}")
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"{y.shape[0]} labels but {s.shape[0]} score rows")
    y = _int_labels(y, "y_true")
    if s.ndim == 1 or s.shape[1] <= 2:
        if np.any((y != 0) & (y != 1)):
            raise ValueError("binary y_true must be 0/1")
        names = _names(class_names, 2, default="class")
        s1 = positive_scores(s)
        return _Task(BINARY, y.astype(bool)[:, None], s1[:, None], names[1:], None)
    num_classes = s.shape[1]
    if np.any((y < 0) | (y >= num_classes)):
        raise ValueError(f"labels must lie in [0, {num_classes}) for {num_classes} score columns")
    names = _names(class_names, num_classes, default="class")
    onehot = np.zeros(s.shape, dtype=bool)
    onehot[np.arange(len(y)), y] = True
    return _Task(MULTICLASS, onehot, s, names, y)


def _names(class_names: Sequence[str] | None, num: int, default: str) -> list[str]:
    if class_names is None:
        return [f"{default}_{i}" for i in range(num)]
    names = [str(c) for c in class_names]
    if len(names) != num:
        raise ValueError(f"{len(names)} class names for {num} classes: {names}")
    if len(set(names)) != num:
        raise ValueError(f"class names must be unique: {names}")
    return names


def _predictions(task: _Task, threshold: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Boolean predictions [N, K] and the per-column thresholds used (None for argmax)."""
    if task.kind == MULTICLASS:
        if threshold is not None:
            raise ValueError("multi-class (> 2 classes) predicts the argmax; pass threshold=None")
        pred = np.zeros_like(task.y)
        pred[np.arange(task.n), task.scores.argmax(axis=1)] = True
        return pred, None
    k = task.y.shape[1]
    if threshold is None:
        thr = np.full(k, 0.5)
    elif isinstance(threshold, Mapping):
        missing = set(task.names) - set(threshold)
        if missing:
            raise ValueError(f"threshold mapping lacks classes {sorted(missing)}")
        thr = np.array([float(threshold[name]) for name in task.names])
    else:
        thr = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (k,)).copy()
    return task.scores >= thr, thr


# ---------------------------------------------------------------------------------------------
# Threshold selection
# ---------------------------------------------------------------------------------------------


def _best_threshold(y: np.ndarray, s: np.ndarray, method: ThresholdMethod) -> float:
    """Score value maximising the criterion over all distinct thresholds (ties: highest one)."""
    order = np.argsort(-s, kind="stable")
    s_desc, y_desc = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_desc)), len(s) - 1]  # end of each tie group
    tp = np.cumsum(y_desc)[last].astype(np.float64)
    fp = (last + 1) - tp
    n_pos, n_neg = tp[-1], fp[-1]
    if method == "youden":
        crit = tp / n_pos - fp / n_neg
    elif method == "f1":
        crit = 2 * tp / (tp + fp + n_pos)  # 2TP / (2TP + FP + FN)
    else:
        raise ValueError(f"method must be 'youden' or 'f1', got {method!r}")
    return float(s_desc[last[int(np.argmax(crit))]])


def select_threshold(
    y_val: Any,
    s_val: Any,
    method: ThresholdMethod = "youden",
    class_names: Sequence[str] | None = None,
) -> float | list[float] | None:
    """Decision threshold chosen on validation predictions, to apply unchanged to test.

    `youden` maximises sensitivity + specificity - 1, `f1` maximises F1. Candidates are the
    distinct validation scores (`score >= t` is positive), i.e. sklearn's `roc_curve` thresholds;
    ties go to the highest threshold. Returns a float (binary), a list with one threshold per
    class (multi-label; 0.5 with a warning for a class that lacks positives or negatives in
    validation) or None (multi-class uses the argmax).
    """
    task = _prepare(y_val, s_val, class_names)
    if method not in ("youden", "f1"):
        raise ValueError(f"method must be 'youden' or 'f1', got {method!r}")
    if task.kind == MULTICLASS:
        return None
    thresholds = []
    for k, name in enumerate(task.names):
        y, s = task.y[:, k], task.scores[:, k]
        n_pos = int(y.sum())
        usable = n_pos > 0 if method == "f1" else 0 < n_pos < len(y)
        if not usable:
            if task.kind == BINARY:
                raise ValueError(f"cannot choose a {method} threshold: validation has one class")
            warnings.warn(
                f"{name}: {n_pos}/{len(y)} validation positives; using threshold 0.5",
                stacklevel=2,
            )
            thresholds.append(0.5)
            continue
        thresholds.append(_best_threshold(y, s, method))
    return thresholds[0] if task.kind == BINARY else thresholds


# ---------------------------------------------------------------------------------------------
# Point metrics (scikit-learn)
# ---------------------------------------------------------------------------------------------


def _safe_div(num: float, den: float) -> float:
    # zero_division=0, as in sklearn's precision_recall_fscore_support(zero_division=0).
    return float(num) / float(den) if den else 0.0


def _rank_point(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """ROC-AUC (needs both classes) and average precision (needs a positive); NaN if undefined."""
    n_pos = int(y.sum())
    auc = skm.roc_auc_score(y, s) if 0 < n_pos < len(y) else math.nan
    ap = skm.average_precision_score(y, s) if n_pos > 0 else math.nan
    return float(auc), float(ap)


def _binary_column(y: np.ndarray, s: np.ndarray, pred: np.ndarray, threshold: float) -> dict:
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[False, True]).ravel().tolist()
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        y, pred, average="binary", zero_division=0
    )
    auc, ap = _rank_point(y, s)
    return {
        "auc": auc,
        "pr_auc": ap,
        "accuracy": float(skm.accuracy_score(y, pred)),
        "precision": float(precision),
        "recall": float(recall),
        "specificity": _safe_div(tn, tn + fp),
        "f1": float(f1),
        "threshold": float(threshold),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "n": int(len(y)),
        "n_positive": int(tp + fn),
    }


def _multi_point(task: _Task, pred: np.ndarray, thr: np.ndarray | None) -> dict:
    y, s = task.y, task.scores
    mcm = skm.multilabel_confusion_matrix(y, pred)  # [K, 2, 2] [[tn, fp], [fn, tp]]
    tn, fp, fn, tp = (mcm[:, i, j] for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
    prf = {
        avg: skm.precision_recall_fscore_support(y, pred, average=avg, zero_division=0)
        for avg in (None, "macro", "micro", "weighted")
    }
    support = tp + fn
    per_class = {}
    aucs, aps = np.full(len(task.names), np.nan), np.full(len(task.names), np.nan)
    for k, name in enumerate(task.names):
        aucs[k], aps[k] = _rank_point(y[:, k], s[:, k])
        row = {
            "auc": aucs[k],
            "pr_auc": aps[k],
            "accuracy": _safe_div(tp[k] + tn[k], task.n),
            "precision": float(prf[None][0][k]),
            "recall": float(prf[None][1][k]),
            "specificity": _safe_div(tn[k], tn[k] + fp[k]),
            "f1": float(prf[None][2][k]),
        }
        if thr is not None:
            row["threshold"] = float(thr[k])
        row["confusion_matrix"] = [[int(tn[k]), int(fp[k])], [int(fn[k]), int(tp[k])]]
        row["n_positive"] = int(support[k])
        per_class[name] = row
    specificity = np.array([per_class[n]["specificity"] for n in task.names])
    micro_auc, micro_ap = _rank_point(y.ravel(), s.ravel())
    out: dict[str, Any] = {"task": task.kind, "n": task.n, "class_names": list(task.names)}
    if task.kind == MULTICLASS:
        out["accuracy"] = float(skm.accuracy_score(task.labels, s.argmax(axis=1)))
        out["confusion_matrix"] = skm.confusion_matrix(
            task.labels, s.argmax(axis=1), labels=np.arange(len(task.names))
        ).tolist()
    else:
        out["subset_accuracy"] = float(skm.accuracy_score(y, pred))
    out["per_class"] = per_class
    out["macro"] = {
        "auc": _nanmean(aucs),
        "pr_auc": _nanmean(aps),
        "accuracy": float(np.mean([per_class[n]["accuracy"] for n in task.names])),
        "precision": float(prf["macro"][0]),
        "recall": float(prf["macro"][1]),
        "specificity": float(specificity.mean()),
        "f1": float(prf["macro"][2]),
    }
    out["micro"] = {
        "auc": micro_auc,
        "pr_auc": micro_ap,
        "accuracy": _safe_div(tp.sum() + tn.sum(), tp.sum() + tn.sum() + fp.sum() + fn.sum()),
        "precision": float(prf["micro"][0]),
        "recall": float(prf["micro"][1]),
        "specificity": _safe_div(tn.sum(), tn.sum() + fp.sum()),
        "f1": float(prf["micro"][2]),
    }
    out["weighted"] = {
        "auc": _support_weighted(aucs, support),
        "pr_auc": _support_weighted(aps, support),
        "precision": float(prf["weighted"][0]),
        "recall": float(prf["weighted"][1]),
        "f1": float(prf["weighted"][2]),
    }
    return out


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.mean(x[np.isfinite(x)])) if np.isfinite(x).any() else math.nan


def _support_weighted(values: np.ndarray, support: np.ndarray) -> float:
    """Support-weighted mean over classes where the metric is defined (sklearn 'weighted')."""
    ok = np.isfinite(values) & (support > 0)
    return float(np.sum(values[ok] * support[ok]) / np.sum(support[ok])) if ok.any() else math.nan


# ---------------------------------------------------------------------------------------------
# Vectorised bootstrap
# ---------------------------------------------------------------------------------------------


class _RankColumn:
    """One binary column sorted once, so AUC and AP of each resample cost O(N).

    Resamples arrive as multiplicities wt [N_images, B] (B resamples side by side, so every row
    operation is a contiguous vector op). Elements map to images via `image`, which lets the
    micro average flatten [N, C] without copying wt C times. Positives find their place among the
    negatives once (searchsorted); per resample only the negative weight below each positive is
    needed, gathered as segment sums by one sparse matmul instead of a cumsum over all negatives.
    """

    def __init__(self, y: np.ndarray, s: np.ndarray, image: np.ndarray, n_images: int):
        order = np.argsort(s, kind="stable")
        y_sorted, s_sorted, img = y[order], s[order], image[order]
        s_pos, s_neg = s_sorted[y_sorted], s_sorted[~y_sorted]
        self.pos_img = img[y_sorted]
        n_neg = len(s_neg)
        lo = np.searchsorted(s_neg, s_pos, side="left")  # negatives strictly below each positive
        hi = np.searchsorted(s_neg, s_pos, side="right")  # negatives below or tied
        bounds = np.unique(np.r_[0, lo, hi, n_neg])
        # segments [bounds[g], bounds[g + 1]) of the sorted negatives, as an image-count matrix
        seg = np.searchsorted(bounds, np.arange(n_neg), side="right") - 1
        self.neg_segments = sparse.csr_array(
            (np.ones(n_neg), (seg, img[~y_sorted])), shape=(len(bounds) - 1, n_images)
        )
        self.lo = np.searchsorted(bounds, lo)  # row of the prefix-sum table for each positive
        self.hi = np.searchsorted(bounds, hi)
        # first positive of each positive's tie group: all of the group count as called at its score
        self.first = np.searchsorted(s_pos, s_pos, side="left")

    def __call__(self, wt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """AUC and AP [B] for multiplicities wt [N_images, B] (NaN where undefined)."""
        b = wt.shape[1]
        w_pos = np.take(wt, self.pos_img, axis=0)  # [m, B]
        prefix = np.zeros((self.neg_segments.shape[0] + 1, b))
        np.cumsum(self.neg_segments @ wt, axis=0, out=prefix[1:])  # negatives before bounds[g]
        cum_pos = np.zeros((len(self.pos_img) + 1, b))
        np.cumsum(w_pos, axis=0, out=cum_pos[1:])
        n_pos, n_neg = cum_pos[-1], prefix[-1]
        below = prefix[self.lo]  # [m, B] negative weight under each positive
        # Mann-Whitney: each positive beats the negatives below it, ties count one half.
        numerator = np.sum(w_pos * (below + prefix[self.hi]), axis=0) / 2
        # AP = sum_t (R_t - R_{t-1}) P_t over distinct thresholds t: each positive weighs the
        # precision at its own score, counting everything scored >= it.
        tp_ge = n_pos - cum_pos[self.first]
        called = tp_ge + (n_neg - below)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = numerator / (n_pos * n_neg)
            precision = np.divide(tp_ge, called, out=np.zeros_like(called), where=called > 0)
            ap = np.sum(w_pos * precision, axis=0) / n_pos
        return auc, ap


def _count_metrics(tp, fp, fn, tn) -> dict[str, np.ndarray]:
    """Accuracy, precision, recall, specificity, F1 from (weighted) counts; 0 on 0/0."""

    def div(a, b):
        return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)

    return {
        "accuracy": div(tp + tn, tp + fp + fn + tn),
        "precision": div(tp, tp + fp),
        "recall": div(tp, tp + fn),
        "specificity": div(tn, tn + fp),
        "f1": div(2 * tp, 2 * tp + fp + fn),
    }


class _Resampled:
    """Every bootstrapped metric of a task, for a block of multiplicities wt [N, B]."""

    def __init__(self, task: _Task, pred: np.ndarray):
        self.task = task
        n, k = task.y.shape
        y, p = task.y, pred
        cells = np.stack([y & p, ~y & p, y & ~p], axis=1)  # tp, fp, fn [N, 3, K]
        # Sparse 0/1 products: single-threaded, so no BLAS thread pool spinning on shared cores.
        self.cells_t = sparse.csr_array(cells.reshape(n, 3 * k).T.astype(np.float64))  # [3K, N]
        images = np.arange(n)
        self.columns = [_RankColumn(y[:, c], task.scores[:, c], images, n) for c in range(k)]
        self.micro = None
        if task.kind != BINARY:
            cell_image = np.repeat(images, k)  # row-major [N, K] -> image of each cell
            self.micro = _RankColumn(y.ravel(), task.scores.ravel(), cell_image, n)
        self.exact = sparse.csr_array(np.all(y == p, axis=1)[None].astype(np.float64))  # [1, N]

    @property
    def width(self) -> int:
        """Rows of [*, B] intermediates per image, to size resample blocks."""
        return 1 + (self.task.y.shape[1] if self.micro is not None else 0)

    def __call__(self, wt: np.ndarray) -> dict[str, np.ndarray]:
        n_eff = wt.sum(axis=0)  # [B] = N for resamples
        k = self.task.y.shape[1]
        counts = (self.cells_t @ wt).reshape(3, k, -1).transpose(0, 2, 1)  # [3, B, K]
        tp, fp, fn = counts
        tn = n_eff[:, None] - tp - fp - fn
        per = _count_metrics(tp, fp, fn, tn)  # each [B, K]
        rank = [col(wt) for col in self.columns]
        per["auc"] = np.stack([r[0] for r in rank], axis=1)
        per["pr_auc"] = np.stack([r[1] for r in rank], axis=1)
        if self.task.kind == BINARY:
            return {m: v[:, 0] for m, v in per.items()}
        out = {f"per_class/{m}": v for m, v in per.items()}
        for m in COUNT_METRICS:
            out[f"macro/{m}"] = per[m].mean(axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN
            for m in RANK_METRICS:
                out[f"macro/{m}"] = np.nanmean(per[m], axis=1)
        micro = _count_metrics(tp.sum(1), fp.sum(1), fn.sum(1), tn.sum(1))
        for m, v in micro.items():
            out[f"micro/{m}"] = v
        out["micro/auc"], out["micro/pr_auc"] = self.micro(wt)
        support = tp + fn  # [B, K]
        for m in ("precision", "recall", "f1", "auc", "pr_auc"):
            weight = np.where(np.isfinite(per[m]), support, 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                weighted = np.nansum(per[m] * weight, axis=1) / weight.sum(axis=1)
            out[f"weighted/{m}"] = weighted
        if self.task.kind == MULTICLASS:
            out["accuracy"] = tp.sum(axis=1) / n_eff
        else:
            out["subset_accuracy"] = (self.exact @ wt)[0] / n_eff
        return out


def _resample_counts(rng: np.random.Generator, strata: list[np.ndarray], n: int, b: int):
    """Multiplicities wt [n, b] of b resamples drawn with replacement within each stratum."""
    draws = [idx[rng.integers(0, len(idx), size=(b, len(idx)))] for idx in strata]
    # Resample-major bincount keeps each resample's scatter cache-local; transpose once after.
    flat = np.concatenate(draws, axis=1) + (np.arange(b) * n)[:, None]
    counts = np.bincount(flat.ravel(), minlength=b * n).reshape(b, n)
    return np.ascontiguousarray(counts.T, dtype=np.float64)


def _strata(task: _Task) -> list[np.ndarray]:
    """Binary / multi-class: resample within each class, so every resample keeps the class
    counts (and an AUC). Multi-label rows have no single class, so images are resampled as one
    stratum; a resample that loses all positives of a rare finding gives that class NaN."""
    if task.kind == BINARY:
        labels = task.y[:, 0].astype(np.int64)
    elif task.kind == MULTICLASS:
        labels = task.labels
    else:
        return [np.arange(task.n)]
    return [np.flatnonzero(labels == c) for c in np.unique(labels)]


def _bootstrap(task: _Task, pred: np.ndarray, n_resamples: int, seed: int) -> dict:
    """All bootstrapped metrics as arrays [n_resamples] (or [n_resamples, K] per class)."""
    rng = np.random.default_rng(seed)
    strata = _strata(task)
    resampled = _Resampled(task, pred)
    block = max(1, _BOOTSTRAP_BUDGET // (task.n * resampled.width))
    parts: list[dict] = []
    for start in range(0, n_resamples, block):
        b = min(block, n_resamples - start)
        parts.append(resampled(_resample_counts(rng, strata, task.n, b)))
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _percentile_ci(values: np.ndarray, level: float) -> list | None:
    """Percentile interval over resamples where the metric is defined; None if none are."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def _attach_cis(result: dict, task: _Task, boot: dict, level: float) -> None:
    if task.kind == BINARY:
        for m, v in boot.items():
            result[f"{m}_ci"] = _percentile_ci(v, level)
        return
    for key, v in boot.items():
        if key.startswith("per_class/"):
            m = key.split("/", 1)[1]
            for k, name in enumerate(task.names):
                result["per_class"][name][f"{m}_ci"] = _percentile_ci(v[:, k], level)
        elif "/" in key:
            group, m = key.split("/", 1)
            result[group][f"{m}_ci"] = _percentile_ci(v, level)
        else:
            result[f"{key}_ci"] = _percentile_ci(v, level)


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


# Python scalars and lists, NaN -> None: safe for json.dumps(allow_nan=False).
_to_json = fileio.json_safe


def evaluate(
    y_true: Any,
    scores: Any,
    *,
    threshold: float | Sequence[float] | Mapping[str, float] | None = None,
    class_names: Sequence[str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Every classification metric of one test split, with bootstrap CIs, as a JSON-ready dict.

    `threshold`: binary float / multi-label float, per-class sequence or {name: t} (None: 0.5),
    normally from `select_threshold` on validation; must be None for multi-class (argmax).
    `n_bootstrap` resamples of the test images (0 disables CIs) give percentile intervals at
    `level`, stratified by class for binary and multi-class; the threshold stays fixed.
    """
    task = _prepare(y_true, scores, class_names)
    pred, thr = _predictions(task, threshold)
    if task.kind == BINARY:
        result: dict[str, Any] = _binary_column(task.y[:, 0], task.scores[:, 0], pred[:, 0], thr[0])
        result["task"] = BINARY
        result["positive_class"] = task.names[0]
    else:
        result = _multi_point(task, pred, thr)
    if n_bootstrap:
        boot = _bootstrap(task, pred, int(n_bootstrap), seed)
        _attach_cis(result, task, boot, level)
        result["bootstrap"] = {
            "n_resamples": int(n_bootstrap),
            "seed": int(seed),
            "level": float(level),
            "stratified": task.kind != MULTILABEL,
        }
    return _to_json(result)


# ---------------------------------------------------------------------------------------------
# Across seeds
# ---------------------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def aggregate_seeds(results: Sequence[Mapping], level: float = 0.95) -> dict:
    """Mean, sample std and Student-t interval of every scalar metric across runs (seeds).

    Walks nested dicts (e.g. `evaluate` outputs) key by key; keys whose values are numbers in
    every run become {mean, std, ci: [lo, hi], n, values}, nested dicts recurse, the rest
    (lists such as CIs and confusion matrices, strings) are skipped. None (undefined) values are
    left out of that metric; with fewer than two values std and ci are None.
    """
    if not results:
        raise ValueError("aggregate_seeds needs at least one result")
    out: dict[str, Any] = {}
    for key in results[0]:
        values = [r.get(key) for r in results]
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, Mapping) for v in present):
            out[key] = aggregate_seeds(present, level)
        elif present and all(_is_number(v) for v in present):
            out[key] = _t_summary(np.asarray(present, dtype=np.float64), level)
    return out


def _t_summary(x: np.ndarray, level: float) -> dict:
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "std": None, "ci": None, "n": int(len(x)), "values": x.tolist()}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, df=len(x) - 1)) * std / math.sqrt(len(x))
    return {
        "mean": mean,
        "std": std,
        "ci": [mean - half, mean + half],
        "n": int(len(x)),
        "values": x.tolist(),
    }


# ---------------------------------------------------------------------------------------------
# DeLong
# ---------------------------------------------------------------------------------------------


def _delong_placements(y_true: Any, scores: Sequence[Any]):
    """AUCs [K] and structural components V10 [K, m], V01 [K, n] (Sun & Xu 2014 midranks).

    V10[i] is the share of negatives a positive outranks (ties count 1/2); V01[j] the share of
    positives that outrank a negative. Three midrankings replace DeLong's O(m n) comparisons.
    """
    y = np.asarray(y_true)
    y = _int_labels(y, "y_true")
    if y.ndim != 1 or np.any((y != 0) & (y != 1)):
        raise ValueError("DeLong needs binary 0/1 labels [N]")
    s = np.stack([positive_scores(v) for v in scores])  # [K, N]
    if s.shape[1] != y.shape[0]:
        raise ValueError(f"{y.shape[0]} labels but {s.shape[1]} scores")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    pos = y.astype(bool)
    m, n = int(pos.sum()), int((~pos).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs >= 2 positives and negatives, got {m} and {n}")
    x, z = s[:, pos], s[:, ~pos]
    tx = stats.rankdata(x, axis=1)
    tz_neg = stats.rankdata(z, axis=1)
    t_all = stats.rankdata(np.concatenate([x, z], axis=1), axis=1)
    aucs = (t_all[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (t_all[:, :m] - tx) / n
    v01 = 1.0 - (t_all[:, m:] - tz_neg) / m
    return aucs, v10, v01


def delong_covariance(y_true: Any, scores: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """AUCs [K] and their DeLong covariance matrix [K, K] for K models on the same test set."""
    aucs, v10, v01 = _delong_placements(y_true, scores)
    m, n = v10.shape[1], v01.shape[1]
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_auc_ci(y_true: Any, scores: Any, level: float = 0.95) -> dict:
    """AUC with DeLong variance, standard error and normal CI (clipped to [0, 1])."""
    aucs, cov = delong_covariance(y_true, [scores])
    auc, var = float(aucs[0]), float(cov[0, 0])
    se = math.sqrt(var)
    q = float(stats.norm.ppf(0.5 + level / 2))
    ci = [max(0.0, auc - q * se), min(1.0, auc + q * se)]
    return {"auc": auc, "variance": var, "std_error": se, "ci": ci, "level": level}


def delong_test(y_true: Any, scores_1: Any, scores_2: Any, level: float = 0.95) -> dict:
    """DeLong et al. (1988) two-sided test of AUC1 == AUC2 for paired predictions.

    Returns auc1, auc2, difference (auc1 - auc2), its variance and std_error, z, p_value and a
    normal CI of the difference. Identical predictions give z = 0 and p = 1.
    """
    aucs, v10, v01 = _delong_placements(y_true, [scores_1, scores_2])
    m, n = v10.shape[1], v01.shape[1]
    # Var(V10_1 - V10_2) equals S11 + S22 - 2 S12 but is exactly 0 for identical models.
    var = float(np.var(v10[0] - v10[1], ddof=1) / m + np.var(v01[0] - v01[1], ddof=1) / n)
    diff = float(aucs[0] - aucs[1])
    se = math.sqrt(max(var, 0.0))
    if se > 0:
        z = diff / se
    else:
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
    q = float(stats.norm.ppf(0.5 + level / 2))
    return {
        "auc1": float(aucs[0]),
        "auc2": float(aucs[1]),
        "difference": diff,
        "variance": var,
        "std_error": se,
        "z": float(z),
        "p_value": float(2 * stats.norm.sf(abs(z))),
        "ci": [diff - q * se, diff + q * se],
        "level": level,
    }
