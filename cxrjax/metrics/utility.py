"""Is a synthetic set worth training on? Metrics that ask the paper's question directly.

Distribution metrics (FD, KID, precision / recall) say how close synthetic images are to real
ones, not whether they carry their intended class. These do, with a *judge*: a classifier
trained only on real images the generators also saw, applied to synthetic images.

- `class_fidelity` (GAN-test, Shmelkov et al. 2018): per intended class, the share the judge
  assigns to that class and its mean confidence in it; compared with real validation images
  of the class, it tells whether a generator makes class c at all.
- `acceptance_thresholds` / `accept`: a filter that keeps a synthetic image only when the judge
  assigns it to its class with a confidence real images of that class reach (`tau_c` keeps
  `keep` of real class-c images).
- `gate`: a generator is adequate when its synthetic images' class fidelity is within
  `margin` of real images' for every gated class.
- `distance_matrix`: FD / KID between every synthetic class and every real class, so that
  "synthetic normals sit nearer real pneumonia than real normals" is visible.
- `rank_agreement`: do quality metrics rank generators the way their measured utility does?

All functions are pure numpy over given probabilities / features; labels are class indices.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats

from cxrjax.metrics import generative


def _probs_labels(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be [N, K] aligned with labels [N]; got {probs.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels outside [0, {probs.shape[1]})")
    return probs, labels


def class_fidelity(probs, labels, class_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per class c: images intended as c, the share the judge assigns to c (argmax), and the
    judge's mean probability of c. Classes without images get n = 0 and None values."""
    probs, labels = _probs_labels(probs, labels)
    out = {}
    for c, name in enumerate(class_names):
        rows = probs[labels == c]
        if not len(rows):
            out[name] = {"n": 0, "assigned_fraction": None, "mean_confidence": None}
            continue
        out[name] = {
            "n": int(len(rows)),
            "assigned_fraction": float(np.mean(np.argmax(rows, axis=1) == c)),
            "mean_confidence": float(np.mean(rows[:, c])),
        }
    return out


def acceptance_thresholds(
    probs, labels, class_names: Sequence[str], keep: float = 0.95
) -> dict[str, float | None]:
    """tau_c: the judge confidence in c that `keep` of the real class-c images reach.

    The (1 - keep) quantile of p_c over real images of class c (numpy's linear
    interpolation), so about `keep` of them have p_c >= tau_c. None for a class without images.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    probs, labels = _probs_labels(probs, labels)
    out = {}
    for c, name in enumerate(class_names):
        values = probs[labels == c, c]
        out[name] = float(np.quantile(values, 1.0 - keep)) if len(values) else None
    return out


def accept(probs, labels, thresholds: Mapping[str, float | None], class_names) -> np.ndarray:
    """bool [N]: the judge's top class is the intended one and its confidence >= tau_c."""
    probs, labels = _probs_labels(probs, labels)
    tau = np.array(
        [np.inf if thresholds.get(n) is None else thresholds[n] for n in class_names], np.float64
    )
    confidence = probs[np.arange(len(labels)), labels]
    return (np.argmax(probs, axis=1) == labels) & (confidence >= tau[labels])


def gate(
    synthetic: Mapping[str, Mapping[str, Any]],
    real: Mapping[str, Mapping[str, Any]],
    *,
    margin: float,
    classes: Sequence[str],
) -> dict[str, Any]:
    """Adequate when, for every class in `classes`, synthetic class fidelity (assigned
    fraction) >= real fidelity - margin. A class without synthetic images fails."""
    rows = {}
    for name in classes:
        s = synthetic.get(name, {}).get("assigned_fraction")
        r = real.get(name, {}).get("assigned_fraction")
        gap = None if s is None or r is None else r - s
        rows[name] = {
            "synthetic": s,
            "real": r,
            "gap": gap,
            "passed": gap is not None and gap <= margin,
        }
    failed = [name for name, row in rows.items() if not row["passed"]]
    return {
        "adequate": not failed,
        "margin": float(margin),
        "per_class": rows,
        "failed_classes": failed,
    }


def distance_matrix(
    real_features,
    real_labels,
    synthetic_features,
    synthetic_labels,
    class_names: Sequence[str],
    *,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """FD and KID between every synthetic class (rows) and every real class (columns).

    Cells whose sets have fewer than 2 images are None. `min_images` per cell and the feature
    dimension are returned so a reader can see when FD is rank-deficient (fewer images than
    dimensions: biased; compare cells of one matrix, not across runs).
    """
    real_features = np.asarray(real_features, np.float64)
    synthetic_features = np.asarray(synthetic_features, np.float64)
    real_labels = np.asarray(real_labels).reshape(-1)
    synthetic_labels = np.asarray(synthetic_labels).reshape(-1)
    synth_classes = [c for c in range(len(class_names)) if np.any(synthetic_labels == c)]
    fd, kid, sizes = [], [], []
    for s in synth_classes:
        fake = synthetic_features[synthetic_labels == s]
        fd_row, kid_row, size_row = [], [], []
        for r in range(len(class_names)):
            real = real_features[real_labels == r]
            n = min(len(real), len(fake))
            size_row.append(int(n))
            if n < 2:
                fd_row.append(None)
                kid_row.append(None)
                continue
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", generative.MetricWarning)
                fd_value = generative.frechet_distance(real, fake)
                kid_value = generative.kid(
                    real,
                    fake,
                    subset_size=min(kid_subset_size, n),
                    num_subsets=kid_subsets,
                    seed=seed,
                )["kid"]
            fd_row.append(None if not math.isfinite(fd_value) else float(fd_value))
            kid_row.append(None if not math.isfinite(kid_value) else float(kid_value))
        fd.append(fd_row)
        kid.append(kid_row)
        sizes.append(size_row)
    return {
        "rows": [f"synthetic {class_names[s]}" for s in synth_classes],
        "columns": [f"real {name}" for name in class_names],
        "fd": fd,
        "kid": kid,
        "min_images": sizes,
        "feature_dim": int(real_features.shape[1]) if real_features.ndim == 2 else None,
    }


def nearest_real_class(matrix: Mapping[str, Any], metric: str = "fd") -> dict[str, str | None]:
    """For each synthetic class (row), the real class (column) at the smallest distance."""
    out = {}
    for row, values in zip(matrix["rows"], matrix[metric], strict=True):
        finite = [
            (v, col) for v, col in zip(values, matrix["columns"], strict=True) if v is not None
        ]
        out[row] = min(finite)[1] if finite else None
    return out


def rank_agreement(
    metric: Mapping[str, float | None], utility: Mapping[str, float | None], *, higher_is_better
) -> dict[str, Any]:
    """Kendall's tau and Spearman's rho between a quality metric and measured utility.

    Over the variants (generators, filtered sets, ...) where both are known. The metric is
    oriented first (lower-is-better metrics are negated), so +1 means "the metric ranks the
    variants exactly as their utility does". With fewer than 3 variants the ranks cannot
    disagree informatively: values are None.
    """
    keys = [
        k
        for k in metric
        if k in utility
        and metric[k] is not None
        and utility[k] is not None
        and math.isfinite(metric[k])
        and math.isfinite(utility[k])
    ]
    out: dict[str, Any] = {"n": len(keys), "variants": keys}
    if len(keys) < 3:
        return {**out, "kendall_tau": None, "spearman_rho": None, "kendall_p": None}
    sign = 1.0 if higher_is_better else -1.0
    x = np.array([sign * metric[k] for k in keys])
    y = np.array([utility[k] for k in keys])
    tau = scipy.stats.kendalltau(x, y)
    rho = scipy.stats.spearmanr(x, y)
    clean = lambda v: None if v is None or not math.isfinite(v) else float(v)  # noqa: E731
    return {
        **out,
        "kendall_tau": clean(tau.statistic),
        "kendall_p": clean(tau.pvalue),
        "spearman_rho": clean(rho.statistic),
    }


def laplacian_energy(images) -> np.ndarray:
    """Per image: mean |4 x - (up + down + left + right)| over interior pixels, x in [0, 1]
    (uint8 [N, H, W] or [N, H, W, 1] in). Fine detail: smooth images score low."""
    x = np.asarray(images, np.float32)
    if x.ndim == 4:
        x = x[..., 0]
    if np.issubdtype(np.asarray(images).dtype, np.integer):
        x = x / 255.0
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return np.abs(lap).mean(axis=(1, 2))


def fine_detail(synthetic, real) -> dict[str, Any]:
    """Mean Laplacian energy of synthetic vs real images of one class, and their ratio.

    A class-fidelity judge asks only which class an image resembles; a generator whose images
    are smoother than real ones passes it, and a classifier trained on them can learn "smooth =
    this class". A ratio well below 1 says so."""
    s, r = laplacian_energy(synthetic), laplacian_energy(real)
    ratio = float(s.mean() / r.mean()) if len(s) and len(r) and r.mean() > 1e-6 else None
    return {
        "synthetic": float(s.mean()) if len(s) else None,
        "real": float(r.mean()) if len(r) else None,
        "synthetic_sd": float(s.std()) if len(s) else None,
        "real_sd": float(r.std()) if len(r) else None,
        "ratio": ratio,
        "n": [int(len(s)), int(len(r))],
    }
