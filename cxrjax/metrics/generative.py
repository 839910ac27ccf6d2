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


def warn(message: str) -> None:
    warnings.warn(message, MetricWarning, stacklevel=3)


def nan_dict(keys, reason: str) -> dict[str, Any]:
    warn(reason)
    return {**{key: math.nan for key in keys}, "reason": reason}


def as_features(x, name: str, *, flatten: bool = False) -> np.ndarray:
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


def check_same_dim(real: np.ndarray, fake: np.ndarray) -> None:
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape[1]}, fake {fake.shape[1]}")


# ----------------------------------------------------------------------------------------------
# Fréchet distance


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] in float64, accumulated in row chunks.

    Two passes (mean, then centred products) because the one-pass E[xx^T] - mu mu^T loses
    digits when features have a large mean, and chunks avoid a float64 copy of all features.
    """
    x = as_features(features, "features")
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
        warn(
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
    real, fake = as_features(real, "real"), as_features(fake, "fake")
    check_same_dim(real, fake)
    d = real.shape[1]
    if min(len(real), len(fake)) < 2:
        warn(f"Fréchet distance needs >= 2 samples per set, got {len(real)} and {len(fake)}")
        return math.nan
    if min(len(real), len(fake)) < d:
        warn(
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
    real, fake = as_features(real, "real"), as_features(fake, "fake")
    check_same_dim(real, fake)
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(
            f"need num_subsets >= 1, subset_size >= 2; got {num_subsets}, {subset_size}"
        )
    n = min(len(real), len(fake))
    if n < 2:
        reason = f"KID needs >= 2 samples per set, got {len(real)} and {len(fake)}"
        return nan_dict(("kid", "kid_std_err"), reason)
    if n < subset_size:
        warn(f"KID subset size reduced from {subset_size} to {n} (smaller set has {n} samples)")
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


_HIGHEST = jax.lax.Precision.HIGHEST


def _blocks(x, chunk: int):
    """[N, D] padded to a multiple of chunk -> blocks [B, chunk, D], |x|^2 [B, chunk], indices."""
    n, d = x.shape
    blocks = x.reshape(n // chunk, chunk, d)
    return blocks, jnp.sum(blocks * blocks, axis=-1), jnp.arange(n).reshape(-1, chunk)


def _sq_dists(q, q_sq, r, r_sq):
    """Squared distances [Bq, Br] of two blocks via |q|^2 + |r|^2 - 2 q.r (one matmul)."""
    # HIGHEST: keep fp32 matmuls on GPUs that would default to TF32.
    cross = jnp.dot(q, r.T, precision=_HIGHEST)
    return jnp.maximum(q_sq[:, None] + r_sq[None, :] - 2.0 * cross, 0.0)


def _merge_top_k(best_d2, best_idx, d2, idx, k: int):
    """Running top-k: the k smallest of the current best [B, k] and a new block [B, C]."""
    all_d2 = jnp.concatenate([best_d2, d2], axis=1)
    all_idx = jnp.concatenate([best_idx, jnp.broadcast_to(idx, d2.shape)], axis=1)
    neg_top, pos = jax.lax.top_k(-all_d2, k)
    return -neg_top, jnp.take_along_axis(all_idx, pos, axis=1)


@functools.partial(jax.jit, static_argnames=("k", "row_chunk", "col_chunk"))
def _cross_knn_kernel(queries, refs, num_refs, *, k, row_chunk, col_chunk):
    """Indices [Nq, k] of each query's k nearest refs: query blocks x a scan over ref blocks."""
    q_blocks, q_sq, _ = _blocks(queries, row_chunk)
    r_blocks, r_sq, r_idx = _blocks(refs, col_chunk)

    def one_row_block(args):
        q, qs = args

        def body(best, block):
            r, rs, ri = block
            d2 = jnp.where(ri[None, :] >= num_refs, jnp.inf, _sq_dists(q, qs, r, rs))
            return _merge_top_k(*best, d2, ri, k), None

        init = (jnp.full((row_chunk, k), jnp.inf, q.dtype), jnp.full((row_chunk, k), -1))
        (_, best_idx), _ = jax.lax.scan(body, init, (r_blocks, r_sq, r_idx))
        return best_idx

    return jax.lax.map(one_row_block, (q_blocks, q_sq)).reshape(-1, k)


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _self_knn_kernel(x, num, *, k, chunk):
    """Indices [N, k] of each point's k nearest other points, computing each block pair once.

    Distances are symmetric: block (i, j >= i) updates the running top-k of rows i with it and
    of rows j with its transpose, so half the matmuls of a plain query x ref search.
    """
    blocks, sq, idx = _blocks(x, chunk)
    num_blocks = blocks.shape[0]
    block_i, block_j = np.triu_indices(num_blocks)

    def body(best, ij):
        best_d2, best_idx = best  # [num_blocks, chunk, k]
        i, j = ij
        rows, cols = idx[i], idx[j]
        invalid = (rows[:, None] == cols[None, :]) | (rows[:, None] >= num) | (cols[None, :] >= num)
        d2 = jnp.where(invalid, jnp.inf, _sq_dists(blocks[i], sq[i], blocks[j], sq[j]))
        new_d2, new_idx = _merge_top_k(best_d2[i], best_idx[i], d2, cols, k)
        best_d2, best_idx = best_d2.at[i].set(new_d2), best_idx.at[i].set(new_idx)
        # On the diagonal (i == j) the transpose is the same block: merging it twice would
        # list each neighbour twice.
        new_d2, new_idx = _merge_top_k(best_d2[j], best_idx[j], d2.T, rows, k)
        same = i == j
        best_d2 = best_d2.at[j].set(jnp.where(same, best_d2[j], new_d2))
        best_idx = best_idx.at[j].set(jnp.where(same, best_idx[j], new_idx))
        return (best_d2, best_idx), None

    init = (
        jnp.full((num_blocks, chunk, k), jnp.inf, x.dtype),
        jnp.full((num_blocks, chunk, k), -1),
    )
    (_, best_idx), _ = jax.lax.scan(body, init, (jnp.asarray(block_i), jnp.asarray(block_j)))
    return best_idx.reshape(-1, k)


@functools.partial(jax.jit, static_argnames=("row_chunk", "col_chunk"))
def _cross_ball_kernel(real, fake, real_r2, fake_r2, num_real, num_fake, *, row_chunk, col_chunk):
    """All PRDC counts from one pass over real x fake distances (closed balls, squared radii).

    Returns, per real sample, how many fake balls contain it [Nr] and its squared distance to
    the nearest fake [Nr]; per fake sample, how many real balls contain it [Nf]. The per-fake
    counts are column sums: each real block emits them and they are summed over real blocks.
    """
    r_blocks, r_sq, r_idx = _blocks(real, row_chunk)
    f_blocks, f_sq, f_idx = _blocks(fake, col_chunk)
    real_r2 = real_r2.reshape(-1, row_chunk)
    fake_r2 = fake_r2.reshape(-1, col_chunk)

    def one_row_block(args):
        x, xs, xi, x_r2 = args
        row_valid = xi < num_real

        def body(carry, block):
            in_fake_balls, min_d2 = carry
            y, ys, yi, y_r2 = block
            col_valid = yi < num_fake
            d2 = _sq_dists(x, xs, y, ys)
            inside_fake = (d2 <= y_r2[None, :]) & col_valid[None, :]
            in_fake_balls = in_fake_balls + jnp.sum(inside_fake, axis=1, dtype=jnp.int32)
            min_d2 = jnp.minimum(min_d2, jnp.min(jnp.where(col_valid, d2, jnp.inf), axis=1))
            inside_real = (d2 <= x_r2[:, None]) & row_valid[:, None]
            return (in_fake_balls, min_d2), jnp.sum(inside_real, axis=0, dtype=jnp.int32)

        init = (jnp.zeros((row_chunk,), jnp.int32), jnp.full((row_chunk,), jnp.inf, x.dtype))
        (in_fake_balls, min_d2), in_real_balls = jax.lax.scan(
            body, init, (f_blocks, f_sq, f_idx, fake_r2)
        )
        return in_fake_balls, min_d2, in_real_balls.reshape(-1)

    in_fake_balls, min_d2, in_real_balls = jax.lax.map(
        one_row_block, (r_blocks, r_sq, r_idx, real_r2)
    )
    return in_fake_balls.reshape(-1), min_d2.reshape(-1), in_real_balls.sum(axis=0)


def compute_dtype(*arrays) -> np.dtype:
    """JAX dtype for the neighbour kernels: float32, or float64 for float64 input under x64."""
    return jax.dtypes.canonicalize_dtype(np.result_type(np.float32, *[a.dtype for a in arrays]))


def pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
    pad = (-len(x)) % multiple
    return np.pad(x, ((0, pad), (0, 0))) if pad else x


def centred_device_arrays(offset: np.ndarray, dtype, *arrays: np.ndarray):
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
    queries = as_features(queries, "queries")
    exclude_self = refs is None
    refs = queries if exclude_self else as_features(refs, "refs")
    check_same_dim(queries, refs)
    available = len(refs) - int(exclude_self)
    if not 1 <= k <= available:
        raise ValueError(f"k={k} needs 1 <= k <= {available} neighbours available")
    if len(queries) == 0:
        return np.zeros((0, k)), np.zeros((0, k), np.int64)
    row_chunk, col_chunk = min(chunk_size, len(queries)), min(chunk_size, len(refs))
    dtype = compute_dtype(queries, refs)
    offset = refs.mean(0, dtype=np.float64)
    if exclude_self:
        (x,) = centred_device_arrays(offset, dtype, queries)
        idx = _self_knn_kernel(pad_rows(x, row_chunk), len(refs), k=k, chunk=row_chunk)
    else:
        q, r = centred_device_arrays(offset, dtype, queries, refs)
        idx = _cross_knn_kernel(
            pad_rows(q, row_chunk),
            pad_rows(r, col_chunk),
            len(refs),
            k=k,
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


def _squared_radii(radii: np.ndarray | None, n: int, chunk: int, dtype) -> np.ndarray:
    """Padded squared radii; a set without radii gets -1, so nothing lies in its balls."""
    r2 = np.full(n, -1.0) if radii is None else radii**2
    return np.pad(r2, (0, (-n) % chunk)).astype(dtype)


def prdc(real, fake, *, k: int = 5, chunk_size: int = 1024) -> dict[str, Any]:
    """Precision, recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020).

    Each point's ball has radius = distance to its k-th nearest neighbour in its own set, self
    excluded; balls are closed (<=). Precision: fraction of fakes inside some real ball.
    Recall: fraction of reals inside some fake ball. Density: mean number of real balls
    containing a fake, divided by k. Coverage: fraction of real balls containing some fake.
    Cost: two self k-NN searches (radii) and one fused real x fake pass for all four counts.
    Entries that need more than k samples in a set are NaN, with a warning and a "reason".
    """
    real, fake = as_features(real, "real"), as_features(fake, "fake")
    check_same_dim(real, fake)
    out = dict.fromkeys(("precision", "recall", "density", "coverage"), math.nan)
    reasons = []
    if len(real) < k + 1 or len(fake) == 0:
        reasons.append(f"precision/density/coverage need >= {k + 1} real and >= 1 fake samples")
    if len(fake) < k + 1 or len(real) == 0:
        reasons.append(f"recall needs >= {k + 1} fake and >= 1 real samples")
    if len(real) and len(fake) and len(reasons) < 2:
        real_radii = knn_radii(real, k=k, chunk_size=chunk_size) if len(real) > k else None
        fake_radii = knn_radii(fake, k=k, chunk_size=chunk_size) if len(fake) > k else None
        row_chunk, col_chunk = min(chunk_size, len(real)), min(chunk_size, len(fake))
        dtype = compute_dtype(real, fake)
        x, y = centred_device_arrays(real.mean(0, dtype=np.float64), dtype, real, fake)
        in_fake_balls, min_d2, in_real_balls = _cross_ball_kernel(
            pad_rows(x, row_chunk),
            pad_rows(y, col_chunk),
            _squared_radii(real_radii, len(real), row_chunk, dtype),
            _squared_radii(fake_radii, len(fake), col_chunk, dtype),
            len(real),
            len(fake),
            row_chunk=row_chunk,
            col_chunk=col_chunk,
        )
        if real_radii is not None:
            in_real_balls = np.asarray(in_real_balls)[: len(fake)]
            out["precision"] = float(np.mean(in_real_balls > 0))
            out["density"] = float(np.mean(in_real_balls) / k)
            min_d2 = np.asarray(min_d2, np.float64)[: len(real)]
            out["coverage"] = float(np.mean(min_d2 <= real_radii**2))
        if fake_radii is not None:
            out["recall"] = float(np.mean(np.asarray(in_fake_balls)[: len(real)] > 0))
    if reasons:
        out["reason"] = "; ".join(reasons) + f"; got {len(real)} real, {len(fake)} fake"
        warn(out["reason"])
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
    real = as_features(real, "real", flatten=True)
    fake = as_features(fake, "fake", flatten=True)
    check_same_dim(real, fake)
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
        return {**empty, **nan_dict(("threshold", "near_copy_rate"), reason)}
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
