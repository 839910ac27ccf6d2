"""Cluster-validity scores on feature sets: is synthetic data separable from real, and does it
carry the class structure it was conditioned on?

  silhouette_score / silhouette_samples   chunked JAX, O(N*K) memory (sklearn's definition)
  davies_bouldin_score, calinski_harabasz_score   float64 numpy, O(N*D) (sklearn's definition)
  real_vs_synthetic   the three scores with real and synthetic as two groups: an ideal generator
                      leaves them inseparable (silhouette ~ 0, Davies-Bouldin large, CH small)
  class_structure     the three scores on real (true class) and synthetic (intended class)
  kmeans_agreement    k-means fitted on real; ARI / NMI of synthetic clusters vs intended class

Silhouette needs, for every sample, its mean distance to each cluster. Row blocks of the
distance matrix are multiplied by a one-hot [N, K] label matrix and summed, so memory is
O(N*K + chunk^2) and N = 50k is fine where a full distance matrix (20 GB) is not. It runs in
JAX's default float dtype (float32 unless `jax_enable_x64`, then float64 for float64 input).
Degenerate label sets (one cluster, every sample its own cluster) warn and give NaN.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import cluster as sk_cluster
from sklearn import metrics as sk_metrics

from cxrjax.metrics import generative

SCORES = ("silhouette", "davies_bouldin", "calinski_harabasz")


def _encode(x, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated features, integer codes [N] in 0..K-1 and cluster sizes [K]."""
    x = generative.as_features(x, "features")
    labels = np.asarray(labels)
    if labels.shape != (len(x),):
        raise ValueError(f"labels must be [N={len(x)}], got shape {labels.shape}")
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return x, codes.reshape(-1), counts


def _degenerate(n: int, k: int, what: str) -> str | None:
    """sklearn's validity rule 2 <= K <= N - 1 (it raises; here it is a warning and NaN)."""
    if 2 <= k <= n - 1:
        return None
    return f"{what} needs 2 <= number of clusters <= N - 1, got {k} clusters for N = {n}"


@functools.partial(jax.jit, static_argnames=("chunk",))
def _cluster_distance_sums(x, onehot, *, chunk):
    """[N, K] sums of euclidean distances from every sample to the members of each cluster.

    x [N, D] and onehot [N, K] are padded to a multiple of `chunk` (padding rows of onehot are
    zero, so padded samples add nothing). The distance matrix is symmetric, so only blocks
    (i, j >= i) are computed and each serves both row block i and row block j: half the work.
    """
    n, d = x.shape
    k = onehot.shape[1]
    num_blocks = n // chunk
    x_blocks = x.reshape(num_blocks, chunk, d)
    onehot_blocks = onehot.reshape(num_blocks, chunk, k)
    sq = jnp.sum(x_blocks * x_blocks, axis=-1)
    block_i, block_j = np.triu_indices(num_blocks)
    diagonal = jnp.eye(chunk, dtype=bool)
    highest = jax.lax.Precision.HIGHEST

    def body(sums, ij):
        i, j = ij
        cross = jnp.dot(x_blocks[i], x_blocks[j].T, precision=highest)
        d2 = jnp.maximum(sq[i][:, None] + sq[j][None, :] - 2.0 * cross, 0.0)
        # Self-distance is exactly 0; the expanded form can leave sqrt(rounding) there instead.
        dist = jnp.where(diagonal & (i == j), 0.0, jnp.sqrt(d2))
        sums = sums.at[i].add(jnp.dot(dist, onehot_blocks[j], precision=highest))
        mirrored = jnp.einsum("ab,ak->bk", dist, onehot_blocks[i], precision=highest)
        return sums.at[j].add(jnp.where(i == j, 0.0, mirrored)), None

    init = jnp.zeros((num_blocks, chunk, k), x.dtype)
    sums, _ = jax.lax.scan(body, init, (jnp.asarray(block_i), jnp.asarray(block_j)))
    return sums.reshape(n, k)


def silhouette_samples(x, labels, *, chunk_size: int = 1024) -> np.ndarray:
    """Silhouette coefficient of every sample, euclidean: (b - a) / max(a, b).

    a = mean distance to the other members of its cluster, b = smallest mean distance to
    another cluster. Samples in one-member clusters get 0, as in sklearn, with a warning.
    """
    x, codes, counts = _encode(x, labels)
    n, k = len(x), len(counts)
    reason = _degenerate(n, k, "silhouette")
    if reason:
        generative.warn(reason)
        return np.full(n, math.nan)
    if (counts == 1).any():
        generative.warn(
            f"silhouette: {(counts == 1).sum()} cluster(s) with one member; those samples score 0"
        )
    chunk = min(chunk_size, n)
    dtype = generative.compute_dtype(x)
    (xc,) = generative.centred_device_arrays(x.mean(0, dtype=np.float64), dtype, x)
    onehot = np.zeros((n, k), dtype)
    onehot[np.arange(n), codes] = 1
    sums = _cluster_distance_sums(
        generative.pad_rows(xc, chunk), generative.pad_rows(onehot, chunk), chunk=chunk
    )
    sums = np.asarray(sums, np.float64)[:n]
    own_size = counts[codes]
    a = sums[np.arange(n), codes] / np.maximum(own_size - 1, 1)
    other_means = sums / counts
    other_means[np.arange(n), codes] = np.inf
    b = other_means.min(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = (b - a) / np.maximum(a, b)
    # a = b = 0 (duplicates across clusters) is 0/0: score it 0, like sklearn.
    return np.where((own_size > 1) & np.isfinite(s), s, 0.0)


def silhouette_score(
    x, labels, *, chunk_size: int = 1024, sample_size: int | None = None, seed: int = 0
) -> float:
    """Mean silhouette coefficient; `sample_size` scores a seeded random subset instead."""
    x, labels = np.asarray(x), np.asarray(labels)
    if sample_size is not None and sample_size < len(x):
        keep = np.random.default_rng(seed).permutation(len(x))[:sample_size]
        x, labels = x[keep], labels[keep]
    s = silhouette_samples(x, labels, chunk_size=chunk_size)
    return float(s.mean()) if len(s) and np.isfinite(s).all() else math.nan


def _cluster_moments(x: np.ndarray, codes: np.ndarray, k: int):
    """float64 centroids [K, D], and per cluster sum of |x - c| and of |x - c|^2 [K]."""
    counts = np.bincount(codes, minlength=k)
    centroids = np.zeros((k, x.shape[1]))
    for start in range(0, len(x), generative._HOST_CHUNK):
        chunk = slice(start, start + generative._HOST_CHUNK)
        np.add.at(centroids, codes[chunk], x[chunk].astype(np.float64))
    centroids /= counts[:, None]
    abs_sum, sq_sum = np.zeros(k), np.zeros(k)
    for start in range(0, len(x), generative._HOST_CHUNK):
        chunk = slice(start, start + generative._HOST_CHUNK)
        sq = np.sum((x[chunk].astype(np.float64) - centroids[codes[chunk]]) ** 2, axis=1)
        abs_sum += np.bincount(codes[chunk], weights=np.sqrt(sq), minlength=k)
        sq_sum += np.bincount(codes[chunk], weights=sq, minlength=k)
    return centroids, abs_sum, sq_sum


def _davies_bouldin(centroids, abs_sum, counts) -> float:
    scatter = abs_sum / counts  # mean distance of members to their centroid
    gaps = np.sqrt(np.sum((centroids[:, None] - centroids[None]) ** 2, axis=-1))
    if np.allclose(scatter, 0) or np.allclose(gaps, 0):
        generative.warn("Davies-Bouldin: clusters are points or share one centroid; returning 0")
        return 0.0
    # Coinciding centroids (and the diagonal) are excluded from the max, as in sklearn.
    gaps[gaps == 0] = np.inf
    ratios = (scatter[:, None] + scatter[None, :]) / gaps
    return float(np.mean(ratios.max(axis=1)))


def _from_moments(x, labels, name, score_fn) -> float:
    """score_fn(centroids, abs_sum, sq_sum, counts) of the clusters; NaN after a warning when
    they are degenerate."""
    x, codes, counts = _encode(x, labels)
    reason = _degenerate(len(x), len(counts), name)
    if reason:
        generative.warn(reason)
        return math.nan
    return score_fn(*_cluster_moments(x, codes, len(counts)), counts)


def davies_bouldin_score(x, labels) -> float:
    """Mean over clusters of the worst (scatter_i + scatter_j) / centroid gap; lower is better."""
    return _from_moments(
        x, labels, "Davies-Bouldin", lambda c, abs_sum, _, n: _davies_bouldin(c, abs_sum, n)
    )


def _calinski_harabasz(centroids, sq_sum, counts) -> float:
    n, k = counts.sum(), len(counts)
    grand_mean = counts @ centroids / n
    between = float(np.sum(counts * np.sum((centroids - grand_mean) ** 2, axis=1)))
    within = float(sq_sum.sum())
    if within == 0:
        generative.warn("Calinski-Harabasz: zero within-cluster dispersion; returning 1")
        return 1.0
    return float(between * (n - k) / (within * (k - 1)))


def calinski_harabasz_score(x, labels) -> float:
    """Between- over within-cluster dispersion, scaled by (N - K) / (K - 1); higher is better."""
    return _from_moments(
        x, labels, "Calinski-Harabasz", lambda c, _, sq_sum, n: _calinski_harabasz(c, sq_sum, n)
    )


def cluster_scores(x, labels, *, chunk_size: int = 1024) -> dict[str, Any]:
    """Silhouette, Davies-Bouldin and Calinski-Harabasz in one pass over the cluster moments."""
    x, codes, counts = _encode(x, labels)
    reason = _degenerate(len(x), len(counts), "cluster scores")
    if reason:
        return generative.nan_dict(SCORES, reason)
    centroids, abs_sum, sq_sum = _cluster_moments(x, codes, len(counts))
    return {
        "silhouette": silhouette_score(x, codes, chunk_size=chunk_size),
        "davies_bouldin": _davies_bouldin(centroids, abs_sum, counts),
        "calinski_harabasz": _calinski_harabasz(centroids, sq_sum, counts),
    }


def real_vs_synthetic(real, fake, *, chunk_size: int = 1024) -> dict[str, Any]:
    """Cluster scores with real and synthetic as the two groups (an ideal generator: ~0 silhouette).

    Signature (real, fake) so `generative.per_class(real_vs_synthetic, ...)` gives it per class.
    """
    real = generative.as_features(real, "real")
    fake = generative.as_features(fake, "fake")
    generative.check_same_dim(real, fake)
    labels = np.concatenate([np.zeros(len(real), np.int32), np.ones(len(fake), np.int32)])
    return cluster_scores(np.concatenate([real, fake]), labels, chunk_size=chunk_size)


def class_structure(
    real, real_labels, fake, fake_labels, *, chunk_size: int = 1024
) -> dict[str, Any]:
    """Class-wise cluster scores: keys "real/<score>", "synthetic/<score>", "pooled/<score>".

    real is grouped by true class, synthetic by intended class; pooled puts both together
    by class, so it stays near the real value only if each synthetic class lands on its real
    counterpart.
    """
    real = generative.as_features(real, "real")
    fake = generative.as_features(fake, "fake")
    generative.check_same_dim(real, fake)
    pooled_x = np.concatenate([real, fake])
    pooled_labels = np.concatenate([np.asarray(real_labels), np.asarray(fake_labels)])
    out = {}
    for name, x, labels in (
        ("real", real, real_labels),
        ("synthetic", fake, fake_labels),
        ("pooled", pooled_x, pooled_labels),
    ):
        scores = cluster_scores(x, labels, chunk_size=chunk_size)
        out.update({f"{name}/{key}": value for key, value in scores.items()})
    return out


def kmeans_agreement(
    real,
    fake,
    fake_labels,
    *,
    n_clusters: int | None = None,
    real_labels=None,
    seed: int = 0,
    n_init: int = 10,
) -> dict[str, Any]:
    """k-means fitted on real features; ARI / NMI of synthetic samples' clusters vs intended class.

    `n_clusters` defaults to the number of intended classes. With `real_labels`, the same scores
    for the real samples ("real_ari", "real_nmi") give the ceiling the synthetic ones aim for.
    """
    real = generative.as_features(real, "real")
    fake = generative.as_features(fake, "fake")
    generative.check_same_dim(real, fake)
    fake_labels = np.asarray(fake_labels)
    if fake_labels.shape != (len(fake),):
        raise ValueError(f"fake_labels must be [M={len(fake)}], got shape {fake_labels.shape}")
    if n_clusters is None:
        n_clusters = len(np.unique(fake_labels))
    keys = ("ari", "nmi") + (("real_ari", "real_nmi") if real_labels is not None else ())
    if n_clusters < 2 or len(real) < n_clusters or len(fake) < 2:
        reason = (
            f"k-means agreement needs >= 2 clusters, >= n_clusters real and >= 2 fake samples; "
            f"got {n_clusters} clusters, {len(real)} real, {len(fake)} fake"
        )
        return {**generative.nan_dict(keys, reason), "n_clusters": n_clusters}
    kmeans = sk_cluster.KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit(real)
    assigned = kmeans.predict(fake)
    out = {
        "ari": float(sk_metrics.adjusted_rand_score(fake_labels, assigned)),
        "nmi": float(sk_metrics.normalized_mutual_info_score(fake_labels, assigned)),
        "n_clusters": n_clusters,
    }
    if real_labels is not None:
        out["real_ari"] = float(sk_metrics.adjusted_rand_score(real_labels, kmeans.labels_))
        out["real_nmi"] = float(
            sk_metrics.normalized_mutual_info_score(real_labels, kmeans.labels_)
        )
    return out
