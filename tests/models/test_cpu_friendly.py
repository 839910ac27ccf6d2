"""cpu_friendly: the same variables, outputs, gradients and running statistics as flax's layers,
on one device and with the batch sharded over four (the statistics stay global-batch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cxrjax import parallel
from cxrjax.models import cpu_friendly


def _images(shape, seed=0):
    # Mean far from zero: a one-pass variance (E[x^2] - mean^2) would lose digits here.
    return jax.random.normal(jax.random.key(seed), shape) * 3.0 + 5.0


def _train_grads(module, x, weights):
    variables = module.init(jax.random.key(1), x)
    params = jax.tree.map(
        lambda p: p + 0.1 * jnp.arange(p.size).reshape(p.shape), variables["params"]
    )

    def loss(params, x):
        y, updates = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.tanh(y) * weights), (y, updates["batch_stats"])

    (_, (y, stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
    return variables, y, stats, grads


@pytest.mark.parametrize("shape", [(8, 6, 6, 5), (4, 3, 3, 16)])
def test_batchnorm_matches_flax_in_training(shape):
    x = _images(shape)
    weights = jax.random.normal(jax.random.key(2), shape)
    kwargs = dict(use_running_average=False, momentum=0.9, epsilon=1e-5)
    ours = _train_grads(cpu_friendly.BatchNorm(**kwargs), x, weights)
    flax_bn = nn.BatchNorm(**kwargs, use_fast_variance=False)
    reference = _train_grads(flax_bn, x, weights)
    # Same variable tree (names, shapes, dtypes, initial values).
    assert jax.tree.map(lambda a: (a.shape, a.dtype), ours[0]) == jax.tree.map(
        lambda a: (a.shape, a.dtype), reference[0]
    )
    for a, b in zip(jax.tree.leaves(ours[0]), jax.tree.leaves(reference[0]), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(ours[1:]), jax.tree.leaves(reference[1:]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)


def test_batchnorm_running_average_matches_flax():
    x = _images((4, 5, 5, 3))
    stats = {"mean": jnp.array([1.0, -2.0, 0.5]), "var": jnp.array([4.0, 0.25, 1.0])}
    params = {"scale": jnp.array([1.5, 0.5, -1.0]), "bias": jnp.array([0.1, 0.2, 0.3])}
    variables = {"params": params, "batch_stats": stats}
    kwargs = dict(use_running_average=True, epsilon=1e-5)
    ours = cpu_friendly.BatchNorm(**kwargs).apply(variables, x)
    reference = nn.BatchNorm(**kwargs).apply(variables, x)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_batchnorm_statistics_are_global_over_a_sharded_batch():
    mesh = parallel.make_mesh(jax.devices()[:4])
    x = _images((8, 4, 4, 6), seed=3)
    module = cpu_friendly.BatchNorm(use_running_average=False, momentum=0.0)
    variables = module.init(jax.random.key(0), x)

    def stats(x):
        return module.apply(variables, x, mutable=["batch_stats"])[1]["batch_stats"]

    sharded = jax.device_put(x, parallel.data_sharding(mesh))
    got = jax.jit(stats)(sharded)
    flat = np.asarray(x, np.float64).reshape(-1, 6)
    np.testing.assert_allclose(got["mean"], flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(got["var"], flat.var(0), rtol=1e-4)


def test_pointwise_conv_matches_flax_conv():
    x = _images((2, 5, 5, 7))
    ours = cpu_friendly.PointwiseConv(4, kernel_init=nn.initializers.normal(1.0))
    reference = nn.Conv(4, (1, 1), use_bias=False, kernel_init=nn.initializers.normal(1.0))
    params = ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, reference.init(jax.random.key(0), x)
    )
    np.testing.assert_array_equal(
        params["params"]["kernel"], reference.init(jax.random.key(0), x)["params"]["kernel"]
    )

    def loss(module, params, x):
        return jnp.sum(jnp.sin(module.apply(params, x)))

    for a, b in zip(
        jax.tree.leaves(jax.grad(lambda p, x: loss(ours, p, x), (0, 1))(params, x)),
        jax.tree.leaves(jax.grad(lambda p, x: loss(reference, p, x), (0, 1))(params, x)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        ours.apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("size", [9, 12])
def test_max_pool_matches_flax_forward_and_gradient(size):
    x = jax.random.normal(jax.random.key(4), (2, size, size, 3))  # no ties

    def reference(x):
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    np.testing.assert_array_equal(cpu_friendly.max_pool_3x3_s2(x), reference(x))
    weights = jax.random.normal(jax.random.key(5), reference(x).shape)
    np.testing.assert_allclose(
        jax.grad(lambda x: jnp.sum(cpu_friendly.max_pool_3x3_s2(x) * weights))(x),
        jax.grad(lambda x: jnp.sum(reference(x) * weights))(x),
        rtol=1e-6,
    )


@pytest.mark.parametrize("size", [6, 7])
def test_avg_pool_matches_flax(size):
    x = jax.random.normal(jax.random.key(6), (2, size, size, 3))
    np.testing.assert_allclose(
        cpu_friendly.avg_pool_2x2(x), nn.avg_pool(x, (2, 2), strides=(2, 2)), rtol=1e-6
    )
