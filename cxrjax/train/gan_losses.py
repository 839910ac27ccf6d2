"""GAN losses as pure functions: WGAN-GP + drift for D, WGAN for G, optional AC-GAN terms.

These follow the official PGGAN losses (`D_wgangp_acgan`, `G_wgan_acgan`). Each takes a
`d_apply_fn(images, labels) -> (scores [B], class_logits [B, K])` closure (K = 0 when
unconditional), so the trainer decides parameters, resolution and alpha. Losses are averaged over
the batch and computed in float32; each returns (loss, metrics) with scalar metrics.

Gradient penalty and sharding: the per-example gradients come from one jax.grad of the *sum* of
D's scores w.r.t. the interpolated batch. With D free of cross-example operations (no BatchNorm)
row i of that gradient is exactly dD(x_i)/dx_i, and under jit with the batch sharded over devices
the result is the same math, so it stays per-example correct. The one cross-example op in PGGAN's D
is minibatch stddev: through it, D(x_j) for j in x_i's group also contributes to row i. The
official code takes the same gradient of the summed scores, so this matches it; set
mbstd_group_size <= 1 for a strictly per-example penalty.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

DApplyFn = Callable[[jax.Array, jax.Array | None], tuple[jax.Array, jax.Array]]


def _d_outputs(d_apply_fn: DApplyFn, images, labels) -> tuple[jax.Array, jax.Array]:
    scores, logits = d_apply_fn(images, labels)
    return scores.astype(jnp.float32).reshape(images.shape[0]), logits.astype(jnp.float32)


def _class_xent(logits: jax.Array, labels: jax.Array | None) -> jax.Array | None:
    """Per-example softmax cross-entropy against integer labels; None when D has no class head."""
    if logits.shape[-1] == 0:
        return None
    if labels is None:
        raise ValueError("D has a class head (AC-GAN) but no labels were given")
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def gradient_penalty(
    d_apply_fn: DApplyFn,
    reals: jax.Array,
    fakes: jax.Array,
    labels: jax.Array | None,
    rng: jax.Array,
    *,
    target: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Per-example (||grad_x D(x_hat)|| - target)^2 at x_hat = lerp(reals, fakes, eps).

    eps = jax.random.uniform(rng, [B, 1, 1, 1]), one mixing factor per example. Returns
    (penalty [B], grad_norm [B]); the norm uses optax.safe_norm so a zero gradient does not give
    NaN in the second-order gradient the D update takes through it.
    """
    eps = jax.random.uniform(rng, (reals.shape[0],) + (1,) * (reals.ndim - 1), reals.dtype)
    mixed = reals + (fakes.astype(reals.dtype) - reals) * eps

    def summed_scores(x):
        return jnp.sum(_d_outputs(d_apply_fn, x, labels)[0])

    grads = jax.grad(summed_scores)(mixed).astype(jnp.float32)
    norms = optax.safe_norm(grads.reshape(grads.shape[0], -1), 0.0, axis=-1)
    return jnp.square(norms - target), norms


def wgan_gp_d_loss(
    d_apply_fn: DApplyFn,
    reals: jax.Array,
    fakes: jax.Array,
    labels: jax.Array | None,
    rng: jax.Array,
    *,
    fake_labels: jax.Array | None = None,
    gp_weight: float = 10.0,
    gp_target: float = 1.0,
    drift_weight: float = 1e-3,
    real_cls_weight: float = 1.0,
    fake_cls_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Discriminator loss: D(fake) - D(real) + GP + drift [+ AC-GAN cross-entropies].

    GP = gp_weight / gp_target^2 * (||grad|| - gp_target)^2 (the official normalisation; plain
    lambda at target 1); drift = drift_weight * D(real)^2 keeps scores near zero. `labels` are the
    reals' integer classes; `fake_labels` (default: `labels`, as the official code generates
    fakes from the reals' labels) are the classes the fakes were generated for. Reals, fakes and
    interpolates go through D in separate calls so minibatch stddev never mixes them.
    """
    fake_labels = labels if fake_labels is None else fake_labels
    real_scores, real_logits = _d_outputs(d_apply_fn, reals, labels)
    fake_scores, fake_logits = _d_outputs(d_apply_fn, fakes, fake_labels)
    penalty, norms = gradient_penalty(d_apply_fn, reals, fakes, labels, rng, target=gp_target)
    drift = jnp.square(real_scores)

    per_example = (
        fake_scores - real_scores + penalty * (gp_weight / gp_target**2) + drift * drift_weight
    )
    metrics = {
        "real_score": jnp.mean(real_scores),
        "fake_score": jnp.mean(fake_scores),
        "wasserstein": jnp.mean(real_scores - fake_scores),
        "gradient_penalty": jnp.mean(penalty),
        "grad_norm": jnp.mean(norms),
        "drift": jnp.mean(drift),
    }
    xent_real = _class_xent(real_logits, labels)
    if xent_real is not None:
        xent_fake = _class_xent(fake_logits, fake_labels)
        per_example = per_example + real_cls_weight * xent_real + fake_cls_weight * xent_fake
        metrics["cls_real"] = jnp.mean(xent_real)
        metrics["cls_fake"] = jnp.mean(xent_fake)
        metrics["cls_acc_real"] = jnp.mean(jnp.argmax(real_logits, -1) == labels)
    loss = jnp.mean(per_example)
    metrics["d_loss"] = loss
    return loss, metrics


def wgan_g_loss(
    d_apply_fn: DApplyFn,
    fakes: jax.Array,
    fake_labels: jax.Array | None,
    *,
    cls_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Generator loss: -D(fake) [+ cls_weight * cross-entropy of D's class head on the fakes]."""
    fake_scores, fake_logits = _d_outputs(d_apply_fn, fakes, fake_labels)
    per_example = -fake_scores
    metrics = {"fake_score": jnp.mean(fake_scores)}
    xent = _class_xent(fake_logits, fake_labels)
    if xent is not None:
        per_example = per_example + cls_weight * xent
        metrics["cls_fake"] = jnp.mean(xent)
    loss = jnp.mean(per_example)
    metrics["g_loss"] = loss
    return loss, metrics
