"""Feature-space metrics for synthetic-image quality: the paper's central evaluation.

Every metric takes two sets of features `real` [N, D] and `fake` [M, D] (embeddings from a
classifier, or flattened pixels) and compares their distributions:

  frechet_distance   Gaussian fit, float64 numpy/scipy on the host (a D x D matrix square root)
  kid                unbiased MMD^2 with a cubic polynomial kernel, averaged over random subsets
  prdc               precision / recall (Kynkäänniemi et al. 2019), density / coverage (Naeem et
                     al. 2020) from exact k-nearest-neighbour balls
  memorisation       each synthetic sample's nearest real sample, and the near-copy rate

The neighbour searches run as jitted JAX over row blocks x column blocks with a running top-k,
so an N x N distance matrix never exists (50k x 50k would be 10 GB). They compute in JAX's
default float dtype (float32 unless `jax_enable_x64`); distances that are returned are then
recomputed exactly in float64 on the host for the neighbours found.

Too few samples never crash and never give an imaginary number: the metric warns with a
`MetricWarning` that says why and returns NaN (dict results also carry a "reason" entry).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

# Rows per host chunk when a float64 pass over the features would otherwise copy them whole.
_HOST_CHUNK = 4096


class MetricWarning(UserWarning):
    """A metric was computed on too little data, or needed a numerical fallback."""


def _warn(message: str) -> None:
    warnings.warn(message, MetricWarning, stacklevel=3)


def _nan_dict(keys, reason: str) -> dict[str, Any]:
    _warn(reason)
    return {**{key: math.nan for key in keys}, "reason": reason}


def _as_features(x, name: str, *, flatten: bool = False) -> np.ndarray:
    """Validates an [N, D] feature array (or [N, ...] when `flatten`) without copying floats."""
    x = np.asarray(x)
    if flatten and x.ndim >= 1:
        x = x.reshape(len(x), math.prod(x.shape[1:]))
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, D] features, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _check_same_dim(real: np.ndarray, fake: np.ndarray) -> None:
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape[1]}, fake {fake.shape[1]}")


# ----------------------------------------------------------------------------------------------
# Fréchet distance


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] in float64, accumulated in row chunks.

    Two passes (mean, then centred products) because the one-pass E[xx^T] - mu mu^T loses
    digits when features have a large mean, and chunks avoid a float64 copy of all features.
    """
    x = _as_features(features, "features")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"need >= 2 samples for a covariance, got {n}")
    mu = np.zeros(d)
    for start in range(0, n, _HOST_CHUNK):
        mu += x[start : start + _HOST_CHUNK].sum(0, dtype=np.float64)
    mu /= n
    sigma = np.zeros((d, d))
    for start in range(0, n, _HOST_CHUNK):
        xc = x[start : start + _HOST_CHUNK].astype(np.float64) - mu
        sigma += xc.T @ xc
    sigma /= n - 1
    return mu, sigma


def _sqrtm_is_accurate(root: np.ndarray, product: np.ndarray, rtol: float) -> bool:
    if not np.isfinite(root).all():
        return False
    scale = np.linalg.norm(product)
    return bool(np.linalg.norm(root @ root - product) <= rtol * max(scale, np.finfo(float).tiny))


def frechet_distance_from_stats(
    mu1,
    sigma1,
    mu2,
    sigma2,
    *,
    eps: float = 1e-6,
    imag_rtol: float = 1e-3,
    sqrtm_rtol: float = 1e-4,
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), in float64 with scipy's sqrtm.

    If sqrtm(S1 S2) is not finite or does not square back to S1 S2 within `sqrtm_rtol`
    (a singular product, e.g. fewer samples than dims), retries with eps * I added to both
    covariances and warns. Rounding leaves small imaginary parts on the diagonal; they are
    dropped when below `imag_rtol` times the largest real diagonal entry, else ValueError.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if (
        mu1.shape != mu2.shape
        or sigma1.shape != sigma2.shape
        or sigma1.shape != (len(mu1), len(mu1))
    ):
        raise ValueError(
            f"inconsistent shapes: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}"
        )
    product = sigma1 @ sigma2
    root = scipy.linalg.sqrtm(product)
    if not _sqrtm_is_accurate(root, product, sqrtm_rtol):
        _warn(
            f"sqrtm(sigma1 @ sigma2) is inaccurate (singular product); adding {eps:g} * I to "
            "both covariances"
        )
        offset = eps * np.eye(len(mu1))
        product = (sigma1 + offset) @ (sigma2 + offset)
        root = scipy.linalg.sqrtm(product)
        if not _sqrtm_is_accurate(root, product, sqrtm_rtol):
            raise ValueError(f"sqrtm still inaccurate after a {eps:g} * I offset; raise eps")
    diag = np.diagonal(root)
    if np.iscomplexobj(diag):
        max_imag = np.abs(diag.imag).max()
        if max_imag > imag_rtol * max(np.abs(diag.real).max(), np.finfo(float).tiny):
            raise ValueError(f"sqrtm has a large imaginary component ({max_imag:.3g})")
        diag = diag.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * diag.sum())


def frechet_distance(real, fake, **kwargs) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID on Inception features).

    Warns when a set has fewer samples than feature dims (rank-deficient covariance: the value
    is biased and unstable); NaN with a warning below 2 samples. kwargs: see
    `frechet_distance_from_stats`.
    """
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    _check_same_dim(real, fake)
    d = real.shape[1]
    if min(len(real), len(fake)) < 2:
        _warn(f"Fréchet distance needs >= 2 samples per set, got {len(real)} and {len(fake)}")
        return math.nan
    if min(len(real), len(fake)) < d:
        _warn(
            f"Fréchet distance with fewer samples ({len(real)}, {len(fake)}) than dims ({d}): "
            "covariances are rank-deficient, the value is biased"
        )
    return frechet_distance_from_stats(*feature_stats(real), *feature_stats(fake), **kwargs)


# ----------------------------------------------------------------------------------------------
# Kernel inception distance


def _polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size samples with k(a, b) = (a.b / d + 1)^3."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    # Diagonals k(a, a) are excluded: that is what makes the estimator unbiased.
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kid(
    real,
    fake,
    *,
    subset_size: int = 1000,
    num_subsets: int = 100,
    seed: int = 0,
    dtype=np.float64,
) -> dict[str, Any]:
    """Kernel inception distance: mean and standard error of unbiased MMD^2 over subsets.

    Each subset draws, with `np.random.default_rng(seed)`, `subset_size` real rows then
    `subset_size` fake rows without replacement. Subsets shrink (with a warning) to the smaller
    set; NaN below 2 samples. `dtype=np.float32` halves the matmul time at ~1e-6 accuracy.
    Returns {"kid", "kid_std_err", "subset_size", "num_subsets"} (+ "reason" when NaN).
    """
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    _check_same_dim(real, fake)
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(
            f"need num_subsets >= 1, subset_size >= 2; got {num_subsets}, {subset_size}"
        )
    n = min(len(real), len(fake))
    if n < 2:
        reason = f"KID needs >= 2 samples per set, got {len(real)} and {len(fake)}"
        return _nan_dict(("kid", "kid_std_err"), reason)
    if n < subset_size:
        _warn(f"KID subset size reduced from {subset_size} to {n} (smaller set has {n} samples)")
        subset_size = n
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        x = real[rng.choice(len(real), subset_size, replace=False)].astype(dtype)
        y = fake[rng.choice(len(fake), subset_size, replace=False)].astype(dtype)
        values[i] = _polynomial_mmd2_unbiased(x, y)
    std_err = values.std(ddof=1) / math.sqrt(num_subsets) if num_subsets > 1 else math.nan
    return {
        "kid": float(values.mean()),
        "kid_std_err": float(std_err),
        "subset_size": subset_size,
        "num_subsets": num_subsets,
    }


# ----------------------------------------------------------------------------------------------
# Chunked exact neighbour search (JAX)


def _pairwise_scan(queries, refs, ref_extras, init, step, row_chunk: int, col_chunk: int):
    """Folds `step` over squared distances of every (query block, ref block) pair.

    queries [Nq, D] and refs [Nr, D] are already padded to multiples of the chunks. For each
    query block, `step(carry, d2 [row_chunk, col_chunk], q_idx, r_idx, extras_block)` runs over
    the ref blocks in a scan; the final carries of all query blocks are concatenated. Only
    one row_chunk x col_chunk distance block is alive at a time.
    """
    nq, d = queries.shape
    nr = refs.shape[0]
    q_blocks = queries.reshape(nq // row_chunk, row_chunk, d)
    r_blocks = refs.reshape(nr // col_chunk, col_chunk, d)
    r_sq = jnp.sum(r_blocks * r_blocks, axis=-1)
    r_idx = jnp.arange(nr).reshape(-1, col_chunk)
    extras = jax.tree.map(lambda e: e.reshape(nr // col_chunk, col_chunk, *e.shape[1:]), ref_extras)

    def one_row_block(args):
        q, q_idx = args
        q_sq = jnp.sum(q * q, axis=-1)

        def body(carry, block):
            r, rs, ri, ex = block
            # HIGHEST: keep fp32 matmuls on GPUs that would default to TF32.
            cross = jnp.dot(q, r.T, precision=jax.lax.Precision.HIGHEST)
            d2 = jnp.maximum(q_sq[:, None] + rs[None, :] - 2.0 * cross, 0.0)
            return step(carry, d2, q_idx, ri, ex), None

        carry, _ = jax.lax.scan(body, init(row_chunk), (r_blocks, r_sq, r_idx, extras))
        return carry

    out = jax.lax.map(one_row_block, (q_blocks, jnp.arange(nq).reshape(-1, row_chunk)))
    return jax.tree.map(lambda o: o.reshape(nq, *o.shape[2:]), out)


@functools.partial(jax.jit, static_argnames=("k", "exclude_self", "row_chunk", "col_chunk"))
def _knn_kernel(queries, refs, num_refs, *, k, exclude_self, row_chunk, col_chunk):
    """Squared distances [Nq, k] (ascending) and indices of each query's k nearest refs."""

    def init(rows):
        return (jnp.full((rows, k), jnp.inf, queries.dtype), jnp.full((rows, k), -1, jnp.int32))

    def step(carry, d2, q_idx, r_idx, _):
        best_d2, best_idx = carry
        invalid = r_idx[None, :] >= num_refs
        if exclude_self:
            invalid = invalid | (q_idx[:, None] == r_idx[None, :])
        d2 = jnp.where(invalid, jnp.inf, d2)
        all_d2 = jnp.concatenate([best_d2, d2], axis=1)
        all_idx = jnp.concatenate([best_idx, jnp.broadcast_to(r_idx, d2.shape)], axis=1)
        neg_top, pos = jax.lax.top_k(-all_d2, k)
        return -neg_top, jnp.take_along_axis(all_idx, pos, axis=1)

    return _pairwise_scan(queries, refs, (), init, step, row_chunk, col_chunk)


@functools.partial(jax.jit, static_argnames=("row_chunk", "col_chunk"))
def _ball_kernel(queries, refs, ref_radius2, num_refs, *, row_chunk, col_chunk):
    """Per query: how many ref balls (closed, squared radii) contain it, and min squared dist."""

    def init(rows):
        return (jnp.zeros((rows,), jnp.int32), jnp.full((rows,), jnp.inf, queries.dtype))

    def step(carry, d2, q_idx, r_idx, radius2):
        count, min_d2 = carry
        valid = r_idx[None, :] < num_refs
        inside = valid & (d2 <= radius2[None, :])
        count = count + jnp.sum(inside, axis=1, dtype=jnp.int32)
        min_d2 = jnp.minimum(min_d2, jnp.min(jnp.where(valid, d2, jnp.inf), axis=1))
        return count, min_d2

    return _pairwise_scan(queries, refs, ref_radius2, init, step, row_chunk, col_chunk)


def compute_dtype(*arrays) -> np.dtype:
    """JAX dtype for the neighbour kernels: float32, or float64 for float64 input under x64."""
    return jax.dtypes.canonicalize_dtype(np.result_type(np.float32, *[a.dtype for a in arrays]))


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
    pad = (-len(x)) % multiple
    return np.pad(x, ((0, pad), (0, 0))) if pad else x


def _centred_device_arrays(offset: np.ndarray, dtype, *arrays: np.ndarray):
    """Subtracts a common offset so |x|^2 + |y|^2 - 2 x.y cancels less in float32."""
    return [np.asarray(a - offset.astype(a.dtype), dtype=dtype) for a in arrays]


def _exact_distances(queries: np.ndarray, refs: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """float64 ||q_i - r_idx[i, j]|| [M, k], in row chunks to bound the gathered copy."""
    out = np.empty(idx.shape)
    rows = max(1, _HOST_CHUNK // max(1, idx.shape[1]))
    for start in range(0, len(queries), rows):
        q = queries[start : start + rows, None, :].astype(np.float64)
        r = refs[idx[start : start + rows]].astype(np.float64)
        out[start : start + rows] = np.sqrt(np.sum((q - r) ** 2, axis=-1))
    return out


def knn_distances(
    queries, refs=None, *, k: int, chunk_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest refs of every query: float64 distances [M, k] ascending, indices [M, k].

    With `refs=None` the queries are searched against themselves, excluding each point itself
    (a duplicate point still counts, at distance 0). Neighbours are selected in chunked JAX;
    the returned distances are recomputed in float64 for those neighbours.
    """
    queries = _as_features(queries, "queries")
    exclude_self = refs is None
    refs = queries if exclude_self else _as_features(refs, "refs")
    _check_same_dim(queries, refs)
    available = len(refs) - int(exclude_self)
    if not 1 <= k <= available:
        raise ValueError(f"k={k} needs 1 <= k <= {available} neighbours available")
    if len(queries) == 0:
        return np.zeros((0, k)), np.zeros((0, k), np.int64)
    row_chunk, col_chunk = min(chunk_size, len(queries)), min(chunk_size, len(refs))
    dtype = compute_dtype(queries, refs)
    offset = refs.mean(0, dtype=np.float64)
    if exclude_self:
        # Self exclusion compares global indices, so both sides need the same padding.
        (q,) = _centred_device_arrays(offset, dtype, queries)
        r = q
    else:
        q, r = _centred_device_arrays(offset, dtype, queries, refs)
    _, idx = _knn_kernel(
        _pad_rows(q, row_chunk),
        _pad_rows(r, col_chunk),
        len(refs),
        k=k,
        exclude_self=exclude_self,
        row_chunk=row_chunk,
        col_chunk=col_chunk,
    )
    idx = np.asarray(idx)[: len(queries)].astype(np.int64)
    dist = _exact_distances(queries, refs, idx)
    order = np.argsort(dist, axis=1, kind="stable")
    return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)


def knn_radii(features, *, k: int = 5, chunk_size: int = 1024) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour in the same set, self excluded."""
    dist, _ = knn_distances(features, k=k, chunk_size=chunk_size)
    return dist[:, -1]


def _ball_stats(queries, refs, radii, chunk_size, dtype, offset):
    row_chunk, col_chunk = min(chunk_size, len(queries)), min(chunk_size, len(refs))
    q, r = _centred_device_arrays(offset, dtype, queries, refs)
    count, min_d2 = _ball_kernel(
        _pad_rows(q, row_chunk),
        _pad_rows(r, col_chunk),
        np.pad(radii**2, (0, (-len(refs)) % col_chunk)).astype(dtype),
        len(refs),
        row_chunk=row_chunk,
        col_chunk=col_chunk,
    )
    return np.asarray(count)[: len(queries)], np.asarray(min_d2)[: len(queries)]


def prdc(real, fake, *, k: int = 5, chunk_size: int = 1024) -> dict[str, Any]:
    """Precision, recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020).

    Each point's ball has radius = distance to its k-th nearest neighbour in its own set, self
    excluded; balls are closed (<=). Precision: fraction of fakes inside some real ball.
    Recall: fraction of reals inside some fake ball. Density: mean number of real balls
    containing a fake, divided by k. Coverage: fraction of real balls containing some fake.
    Entries that need more than k samples in a set are NaN, with a warning and a "reason".
    """
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    _check_same_dim(real, fake)
    out: dict[str, Any] = {}
    reasons = []
    if len(real) < k + 1 or len(fake) == 0:
        reasons.append(f"precision/density/coverage need >= {k + 1} real and >= 1 fake samples")
        out.update(precision=math.nan, density=math.nan, coverage=math.nan)
    if len(fake) < k + 1 or len(real) == 0:
        reasons.append(f"recall needs >= {k + 1} fake and >= 1 real samples")
        out["recall"] = math.nan
    reasons_text = f"; got {len(real)} real, {len(fake)} fake"
    dtype = compute_dtype(real, fake)
    offset = real.mean(0, dtype=np.float64) if len(real) else np.zeros(real.shape[1])
    if "precision" not in out:
        real_radii = knn_radii(real, k=k, chunk_size=chunk_size)
        count, _ = _ball_stats(fake, real, real_radii, chunk_size, dtype, offset)
        out["precision"] = float(np.mean(count > 0))
        out["density"] = float(np.mean(count) / k)
        # Coverage asks the reverse question, real -> nearest fake: a k=1 search.
        nearest_fake, _ = knn_distances(real, fake, k=1, chunk_size=chunk_size)
        out["coverage"] = float(np.mean(nearest_fake[:, 0] <= real_radii))
    if "recall" not in out:
        fake_radii = knn_radii(fake, k=k, chunk_size=chunk_size)
        count, _ = _ball_stats(real, fake, fake_radii, chunk_size, dtype, offset)
        out["recall"] = float(np.mean(count > 0))
    out = {key: out[key] for key in ("precision", "recall", "density", "coverage")}
    if reasons:
        out["reason"] = "; ".join(reasons) + reasons_text
        _warn(out["reason"])
    return out


# ----------------------------------------------------------------------------------------------
# Memorisation


def memorisation(
    real,
    fake,
    *,
    quantile: float = 0.01,
    num_pairs: int = 16,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Nearest real (training) sample of every synthetic sample, and the near-copy rate.

    Inputs are [N, ...] arrays in any space (features, or images flattened here). The
    threshold is the `quantile` of real-vs-real nearest-neighbour distances (self excluded):
    a synthetic sample closer to a real one than almost all real pairs are to each other is
    a near-copy. Returns
      nn_index [M], nn_distance [M]       nearest real sample of each fake
      real_nn_distance [N]                real-vs-real NN distances
      threshold, near_copy_rate           fraction of fakes with nn_distance < threshold
      closest_pairs [P, 2], closest_distance [P]   (fake index, real index), closest first
    Fewer than 2 real or 1 fake samples give NaN rates with a warning and "reason".
    """
    real = _as_features(real, "real", flatten=True)
    fake = _as_features(fake, "fake", flatten=True)
    _check_same_dim(real, fake)
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    empty = {
        "nn_index": np.zeros((0,), np.int64),
        "nn_distance": np.zeros((0,)),
        "real_nn_distance": np.zeros((0,)),
        "closest_pairs": np.zeros((0, 2), np.int64),
        "closest_distance": np.zeros((0,)),
    }
    if len(real) < 2 or len(fake) == 0:
        reason = f"memorisation needs >= 2 real and >= 1 fake samples, got {len(real)}, {len(fake)}"
        return {**empty, **_nan_dict(("threshold", "near_copy_rate"), reason)}
    nn_distance, nn_index = knn_distances(fake, real, k=1, chunk_size=chunk_size)
    nn_distance, nn_index = nn_distance[:, 0], nn_index[:, 0]
    real_nn_distance = knn_distances(real, k=1, chunk_size=chunk_size)[0][:, 0]
    threshold = float(np.quantile(real_nn_distance, quantile))
    order = np.argsort(nn_distance, kind="stable")[:num_pairs]
    return {
        "nn_index": nn_index,
        "nn_distance": nn_distance,
        "real_nn_distance": real_nn_distance,
        "threshold": threshold,
        "near_copy_rate": float(np.mean(nn_distance < threshold)),
        "closest_pairs": np.stack([order, nn_index[order]], axis=1),
        "closest_distance": nn_distance[order],
    }


# ----------------------------------------------------------------------------------------------
# Per-class evaluation


def _label_key(label):
    return label.item() if isinstance(label, np.generic) else label


def per_class(
    metric_fn: Callable[..., Any],
    real,
    real_labels,
    fake,
    fake_labels,
    *,
    classes=None,
    **kwargs,
) -> dict[Any, Any]:
    """Runs `metric_fn(real[class], fake[class], **kwargs)` for every class label.

    Synthetic samples are grouped by their intended (conditioning) class, real ones by their
    true class. `classes` defaults to the union of both label sets. A class that is missing
    or small on one side is passed through anyway: every metric here guards small sets with
    a warning and NaN, so one thin class does not stop the others.
    """
    real, fake = np.asarray(real), np.asarray(fake)
    real_labels, fake_labels = np.asarray(real_labels), np.asarray(fake_labels)
    if len(real_labels) != len(real) or len(fake_labels) != len(fake):
        raise ValueError("labels must have one entry per sample")
    if classes is None:
        classes = np.union1d(real_labels, fake_labels)
    return {
        _label_key(c): metric_fn(real[real_labels == c], fake[fake_labels == c], **kwargs)
        for c in classes
    }
