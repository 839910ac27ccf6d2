"""WGAN-GP / drift / AC-GAN losses checked on discriminators whose gradients are known by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from cxrjax.models import pggan
from cxrjax.train import gan_losses

SHAPE = (4, 4, 4, 1)


def _linear_d(w):
    """D(x) = <w, x>: its input gradient is w everywhere, so ||grad|| = ||w||."""
    return lambda x, labels: (jnp.sum(x * w, axis=(1, 2, 3)), jnp.zeros((x.shape[0], 0)))


def _quadratic_d(w):
    """D(x) = <w, x^2>: gradient 2 w x depends on the interpolate, i.e. on each example's eps."""
    return lambda x, labels: (jnp.sum(w * x**2, axis=(1, 2, 3)), jnp.zeros((x.shape[0], 0)))


def _data(seed=0, shape=SHAPE):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(k1, shape),
        jax.random.normal(k2, shape),
        jax.random.normal(k3, shape[1:]),
    )


def test_d_loss_on_linear_critic_matches_hand_computation():
    reals, fakes, w = _data()
    w = 0.3 * w
    loss, m = gan_losses.wgan_gp_d_loss(_linear_d(w), reals, fakes, None, jax.random.key(1))
    w, reals, fakes = map(np.asarray, (w, reals, fakes))
    d_real = (reals * w).sum((1, 2, 3))
    d_fake = (fakes * w).sum((1, 2, 3))
    gp = 10.0 * (np.linalg.norm(w) - 1.0) ** 2  # same for every example and every eps
    expected = np.mean(d_fake - d_real) + gp + 1e-3 * np.mean(d_real**2)
    np.testing.assert_allclose(m["gradient_penalty"] * 10.0, gp, rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], np.linalg.norm(w), rtol=1e-5)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(m["wasserstein"], np.mean(d_real - d_fake), rtol=1e-5)
    np.testing.assert_allclose(m["drift"], np.mean(d_real**2), rtol=1e-5)
    assert "cls_real" not in m


def test_gradient_penalty_is_per_example_with_per_example_eps():
    reals, fakes, w = _data(1)
    rng = jax.random.key(7)
    penalty, norms = gan_losses.gradient_penalty(_quadratic_d(w), reals, fakes, None, rng)
    eps = np.asarray(jax.random.uniform(rng, (SHAPE[0], 1, 1, 1)))  # documented eps draw
    assert len(np.unique(eps)) == SHAPE[0]
    mixed = np.asarray(reals) + (np.asarray(fakes) - np.asarray(reals)) * eps
    want = np.linalg.norm((2 * np.asarray(w) * mixed).reshape(SHAPE[0], -1), axis=1)
    np.testing.assert_allclose(norms, want, rtol=1e-5)
    np.testing.assert_allclose(penalty, (want - 1.0) ** 2, rtol=1e-5)


def test_gradient_penalty_unchanged_when_batch_is_sharded():
    n = jax.device_count()
    shape = (2 * n, 4, 4, 1)
    reals, fakes, w = _data(2, shape)
    d_fn = _quadratic_d(w)
    loss_fn = lambda r, f, k: gan_losses.wgan_gp_d_loss(d_fn, r, f, None, k)
    ref_loss, ref_m = jax.jit(loss_fn)(reals, fakes, jax.random.key(3))
    mesh = jax.make_mesh((n,), ("data",))
    batch = NamedSharding(mesh, PartitionSpec("data"))
    reals, fakes = jax.device_put(reals, batch), jax.device_put(fakes, batch)
    loss, m = jax.jit(loss_fn)(reals, fakes, jax.random.key(3))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], ref_m["grad_norm"], rtol=1e-5)


def _xent(logits, labels):
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -logp[np.arange(len(labels)), labels]


def test_acgan_terms_and_generator_loss():
    reals, fakes, w = _data(3)
    logits_real = jnp.array([[2.0, -1.0, 0.5]] * 4)
    logits_fake = jnp.array([[0.0, 1.0, 3.0]] * 4)
    labels = jnp.array([0, 1, 2, 0])
    fake_labels = jnp.array([2, 2, 1, 0])

    def d_fn(x, y):
        scores = jnp.sum(x * w, axis=(1, 2, 3))
        # Tell reals from fakes by identity of the batch (the loss calls D on each separately).
        is_real = jnp.all(x == reals)
        return scores, jnp.where(is_real, logits_real, logits_fake)

    base, _ = gan_losses.wgan_gp_d_loss(_linear_d(w), reals, fakes, None, jax.random.key(0))
    loss, m = gan_losses.wgan_gp_d_loss(
        d_fn,
        reals,
        fakes,
        labels,
        jax.random.key(0),
        fake_labels=fake_labels,
        real_cls_weight=0.5,
        fake_cls_weight=2.0,
    )
    ce_real, ce_fake = _xent(logits_real, labels), _xent(logits_fake, fake_labels)
    np.testing.assert_allclose(m["cls_real"], ce_real.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["cls_fake"], ce_fake.mean(), rtol=1e-5)
    np.testing.assert_allclose(loss - base, 0.5 * ce_real.mean() + 2.0 * ce_fake.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["cls_acc_real"], 0.5)

    g_loss, gm = gan_losses.wgan_g_loss(d_fn, fakes, fake_labels, cls_weight=3.0)
    d_fake = np.asarray(jnp.sum(fakes * w, axis=(1, 2, 3)))
    np.testing.assert_allclose(g_loss, -d_fake.mean() + 3.0 * ce_fake.mean(), rtol=1e-5)
    np.testing.assert_allclose(gm["fake_score"], d_fake.mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="no labels"):
        gan_losses.wgan_g_loss(d_fn, fakes, None)


@pytest.mark.parametrize("group", [1, 2])
def test_pggan_critic_gradient_penalty(group):
    """On the real D: without minibatch stddev the summed-score gradient is per example;
    with it, examples in a group are coupled exactly as in the official code."""
    d = pggan.DiscriminatorTiny(mbstd_group_size=group, num_classes=2)
    reals, fakes, _ = _data(4, (4, 8, 8, 1))
    labels = jnp.array([0, 1, 1, 0])
    variables = jax.jit(lambda: d.init(jax.random.key(0), reals, resolution=8))()

    def loss_fn(params):
        d_fn = lambda x, y: d.apply({"params": params}, x, y, resolution=8, alpha=0.5)
        loss, m = gan_losses.wgan_gp_d_loss(d_fn, reals, fakes, labels, jax.random.key(5))
        _, norms = gan_losses.gradient_penalty(d_fn, reals, fakes, labels, jax.random.key(5))
        # Gradient of each example through D alone (batch of one, minibatch stddev off-path).
        one = lambda x: d_fn(x[None], None)[0][0]
        eps = jax.random.uniform(jax.random.key(5), (4, 1, 1, 1))
        mixed = reals + (fakes - reals) * eps
        alone = jax.vmap(lambda x: jnp.linalg.norm(jax.grad(one)(x)))(mixed)
        return loss, (m, norms, alone)

    (loss, (m, norms, alone)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables["params"]
    )
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert {"cls_real", "cls_fake", "gradient_penalty"} <= set(m)
    if group == 1:
        np.testing.assert_allclose(norms, alone, rtol=1e-4)
    else:
        assert not np.allclose(norms, alone, rtol=1e-3)
