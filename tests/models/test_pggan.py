"""PGGAN building blocks and networks checked against their definitions (Karras et al. 2018)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cxrjax.models import layers, pggan


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _init_g(g, resolution=4, batch=4, rng=None):
    z = jnp.zeros((batch, g.latent_dim))
    labels = jnp.zeros((batch,), jnp.int32) if g.num_classes else None
    return g.init(rng if rng is not None else jax.random.key(0), z, labels, resolution=resolution)


def _init_d(d, resolution=4, batch=4):
    x = jnp.zeros((batch, resolution, resolution, d.num_channels))
    return d.init(jax.random.key(1), x, resolution=resolution)


# ----------------------------------------------------------------------------- layers


def test_equalized_dense_effective_weight_is_he_scaled(rng):
    fan_in, features = 7, 5
    layer = layers.EqualizedDense(features)
    variables = layer.init(rng, jnp.zeros((1, fan_in)))
    kernel = variables["params"]["kernel"]
    # Feeding the identity reads out the effective weight row by row.
    effective = layer.apply(variables, jnp.eye(fan_in))
    np.testing.assert_allclose(effective, kernel * math.sqrt(2.0 / fan_in), rtol=1e-6)
    np.testing.assert_array_equal(variables["params"]["bias"], 0.0)


def test_equalized_weights_are_stored_unit_normal(rng):
    variables = layers.EqualizedConv(64, (3, 3)).init(rng, jnp.zeros((1, 4, 4, 64)))
    kernel = np.asarray(variables["params"]["kernel"])
    assert abs(kernel.std() - 1.0) < 0.05 and abs(kernel.mean()) < 0.05


@pytest.mark.parametrize("gain,expected", [(layers.HE_GAIN, 2.0), (1.0, 1.0)])
def test_equalized_conv_effective_weight(rng, gain, expected):
    c_in, c_out = 2, 3
    layer = layers.EqualizedConv(c_out, (3, 3), gain=gain)
    variables = layer.init(rng, jnp.zeros((1, 5, 5, c_in)))
    kernel = np.asarray(variables["params"]["kernel"])  # [3, 3, C_in, C_out]
    scale = math.sqrt(expected / (9 * c_in))
    for c in range(c_in):
        impulse = np.zeros((1, 5, 5, c_in), np.float32)
        impulse[0, 2, 2, c] = 1.0
        y = np.asarray(layer.apply(variables, impulse))[0]
        # Cross-correlation of a centred impulse: y[3 - i, 3 - j] = w[i, j].
        np.testing.assert_allclose(y[1:4, 1:4][::-1, ::-1], kernel[:, :, c] * scale, rtol=1e-5)


def test_without_wscale_the_scale_moves_into_the_init(rng):
    layer = layers.EqualizedDense(256, use_wscale=False)
    variables = layer.init(rng, jnp.zeros((1, 128)))
    kernel = variables["params"]["kernel"]
    assert abs(float(jnp.std(kernel)) - math.sqrt(2.0 / 128)) < 0.005
    np.testing.assert_allclose(layer.apply(variables, jnp.eye(128)), kernel, rtol=1e-6)


def test_pixel_norm_gives_unit_mean_square_per_pixel(rng):
    x = 3.0 * jax.random.normal(rng, (2, 4, 4, 8)) + 1.0
    y = layers.pixel_norm(x)
    np.testing.assert_allclose(jnp.mean(jnp.square(y), axis=-1), 1.0, rtol=1e-5)
    # Direction is unchanged: y is a positive multiple of x per pixel.
    np.testing.assert_allclose(
        y / jnp.linalg.norm(y, axis=-1, keepdims=True),
        x / jnp.linalg.norm(x, axis=-1, keepdims=True),
        rtol=1e-5,
    )


def test_minibatch_stddev_matches_hand_computation():
    x = np.random.default_rng(0).normal(size=(4, 2, 2, 3)).astype(np.float32)
    y = np.asarray(layers.minibatch_stddev(jnp.asarray(x), group_size=2))
    assert y.shape == (4, 2, 2, 4)
    np.testing.assert_array_equal(y[..., :3], x)
    # Official grouping is strided: with M = 4 // 2 groups, example n is in group n % 2.
    for members in ([0, 2], [1, 3]):
        g = x[members]
        std = np.sqrt(((g - g.mean(0)) ** 2).mean(0) + 1e-8)
        for n in members:
            np.testing.assert_allclose(y[n, ..., 3], std.mean(), rtol=1e-5)


def test_minibatch_stddev_group_larger_than_batch_uses_whole_batch():
    x = np.random.default_rng(1).normal(size=(2, 1, 1, 5)).astype(np.float32)
    y = np.asarray(layers.minibatch_stddev(jnp.asarray(x), group_size=4))
    np.testing.assert_allclose(y[:, 0, 0, 5], np.sqrt(x.var(0) + 1e-8).mean(), rtol=1e-5)


def test_minibatch_stddev_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="multiple of group size"):
        layers.minibatch_stddev(jnp.zeros((6, 4, 4, 2)), group_size=4)


def test_up_and_down_sampling():
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    up = layers.upsample2d(x)
    np.testing.assert_array_equal(up[0, :2, :2, 0], x[0, 0, 0, 0])
    np.testing.assert_array_equal(layers.downsample2d(up), x)
    np.testing.assert_allclose(layers.downsample2d(x)[0, 0, 0, 0], (0 + 1 + 4 + 5) / 4)


# ----------------------------------------------------------------------------- fades


def test_generator_fade_in():
    g = pggan.GeneratorTiny()
    variables = jax.jit(_init_g, static_argnums=(0, 1))(g, 16)
    z = jax.random.normal(jax.random.key(2), (4, g.latent_dim))
    apply_fn = jax.jit(g.apply, static_argnames="resolution")  # one compile per resolution
    at = lambda a, v=variables: apply_fn(v, z, resolution=16, alpha=a)
    prev = apply_fn(variables, z, resolution=8, alpha=1.0)
    np.testing.assert_allclose(at(0.0), layers.upsample2d(prev), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(at(0.25), 0.75 * at(0.0) + 0.25 * at(1.0), rtol=1e-5, atol=1e-6)
    # At alpha = 1 the old toRGB no longer matters; during the fade it does.
    bumped = jax.tree.map(lambda p: p, variables)
    bumped["params"]["to_rgb_8x8"]["bias"] = jnp.ones((1,))
    np.testing.assert_array_equal(at(1.0, bumped), at(1.0))
    assert not np.allclose(at(0.5, bumped), at(0.5))


def test_discriminator_fade_in_mirrors_generator():
    d = pggan.DiscriminatorTiny()
    variables = jax.jit(_init_d, static_argnums=(0, 1))(d, 16)
    x = jax.random.normal(jax.random.key(3), (4, 16, 16, 1))
    apply_fn = jax.jit(d.apply, static_argnames="resolution")
    at = lambda a, v=variables: apply_fn(v, x, resolution=16, alpha=a)
    prev = apply_fn(variables, layers.downsample2d(x), resolution=8, alpha=1.0)
    for got, want in zip(at(0.0), prev, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    bumped = jax.tree.map(lambda p: p, variables)
    bumped["params"]["from_rgb_8x8"]["bias"] = jnp.ones((16,))  # nf(2) maps
    np.testing.assert_array_equal(at(1.0, bumped)[0], at(1.0)[0])
    assert not np.allclose(at(0.5, bumped)[0], at(0.5)[0])


def test_fade_in_reals_and_resize():
    x = jax.random.normal(jax.random.key(4), (2, 8, 8, 1))
    np.testing.assert_allclose(pggan.fade_in_reals(x, 1.0), x)
    coarse = layers.upsample2d(pggan.resize_reals(x, 4))
    np.testing.assert_allclose(pggan.fade_in_reals(x, 0.0), coarse, rtol=1e-6)
    np.testing.assert_allclose(pggan.fade_in_reals(x, 0.5), 0.5 * (x + coarse), rtol=1e-5)


# ----------------------------------------------------------------------------- structure


def _official_g_params(max_log2, channels, latent, classes, nf):
    n = (latent + classes) * 16 * nf(1) + nf(1)  # dense (no bias) + per-channel bias
    n += 9 * nf(1) * nf(1) + nf(1)  # 4x4 conv
    for k in range(3, max_log2 + 1):  # upsample, conv0, conv1
        n += 9 * nf(k - 2) * nf(k - 1) + nf(k - 1) + 9 * nf(k - 1) ** 2 + nf(k - 1)
    n += sum(nf(k - 1) * channels + channels for k in range(2, max_log2 + 1))  # toRGB per lod
    return n


def _official_d_params(max_log2, channels, classes, nf):
    n = sum(channels * nf(k - 1) + nf(k - 1) for k in range(2, max_log2 + 1))  # fromRGB per lod
    for k in range(3, max_log2 + 1):  # conv0, conv1, pool
        n += 9 * nf(k - 1) ** 2 + nf(k - 1) + 9 * nf(k - 1) * nf(k - 2) + nf(k - 2)
    n += 9 * (nf(1) + 1) * nf(1) + nf(1)  # conv on features + minibatch-stddev map
    n += 16 * nf(1) * nf(0) + nf(0) + nf(0) * (1 + classes) + 1 + classes  # dense0, dense1
    return n


@pytest.mark.parametrize("channels", [1, 3])
def test_official_1024_parameter_counts(channels):
    """Expected counts from the official G_paper/D_paper layer list (fmap_base 8192, fmap_max 512).

    Reference: Karras et al. 2018, Table 2 reports 23.1M trainable parameters for each of G and D
    at 1024x1024 RGB; the RGB case is checked against that figure too.
    """
    nf = lambda s: min(int(8192 / 2.0**s), 512)
    g = pggan.GeneratorOfficial1024(num_channels=channels)
    d = pggan.DiscriminatorOfficial1024(num_channels=channels)
    g_params = _count(jax.eval_shape(lambda: _init_g(g)))
    d_params = _count(jax.eval_shape(lambda: _init_d(d)))
    assert g_params == _official_g_params(10, channels, 512, 0, nf)
    assert d_params == _official_d_params(10, channels, 0, nf)
    if channels == 3:
        assert round(g_params / 1e6, 1) == 23.1 and round(d_params / 1e6, 1) == 23.1


def test_conditional_parameter_counts():
    nf = lambda s: min(int(1024 / 2.0**s), 128)
    g = pggan.GeneratorDemo32(num_classes=2)
    d = pggan.DiscriminatorDemo32(num_classes=2)
    assert _count(jax.eval_shape(lambda: _init_g(g))) == _official_g_params(5, 1, 128, 2, nf)
    assert _count(jax.eval_shape(lambda: _init_d(d))) == _official_d_params(5, 1, 2, nf)


def test_growth_shapes_and_one_param_tree():
    g, d = pggan.GeneratorTiny(), pggan.DiscriminatorTiny()
    shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
    g_trees = [shapes(jax.eval_shape(lambda r=r: _init_g(g, r))) for r in (4, 8, 16)]
    d_trees = [shapes(jax.eval_shape(lambda r=r: _init_d(d, r))) for r in (4, 8, 16)]
    assert g_trees[0] == g_trees[1] == g_trees[2]
    assert d_trees[0] == d_trees[1] == d_trees[2]
    g_vars = jax.eval_shape(lambda: _init_g(g, 4))
    d_vars = jax.eval_shape(lambda: _init_d(d, 4))
    z = jnp.zeros((4, g.latent_dim))
    for r in (4, 8, 16):
        img = jax.eval_shape(lambda v, r=r: g.apply(v, z, resolution=r, alpha=0.5), g_vars)
        assert img.shape == (4, r, r, 1)
        scores, logits = jax.eval_shape(
            lambda v, x, r=r: d.apply(v, x, resolution=r, alpha=0.5), d_vars, img
        )
        assert scores.shape == (4,) and logits.shape == (4, 0)


def test_alpha_is_traced_and_resolution_static():
    g = pggan.GeneratorTiny()
    variables = jax.jit(_init_g, static_argnums=(0, 1))(g, 8)
    z = jnp.ones((4, g.latent_dim))
    apply_fn = jax.jit(g.apply, static_argnames="resolution")
    a = apply_fn(variables, z, resolution=8, alpha=jnp.float32(0.2))
    b = apply_fn(variables, z, resolution=8, alpha=jnp.float32(0.7))
    assert apply_fn._cache_size() == 1
    assert not np.allclose(a, b)


def test_conditional_labels_change_outputs():
    g = pggan.GeneratorTiny(num_classes=3)
    d = pggan.DiscriminatorTiny(num_classes=3)
    g_vars = jax.jit(_init_g, static_argnums=(0, 1))(g, 8)
    d_vars = jax.jit(_init_d, static_argnums=(0, 1))(d, 8)
    z = jax.random.normal(jax.random.key(5), (4, g.latent_dim))
    g_apply = jax.jit(g.apply, static_argnames="resolution")
    y0 = g_apply(g_vars, z, jnp.zeros(4, jnp.int32), resolution=8)
    y2 = g_apply(g_vars, z, jnp.full(4, 2, jnp.int32), resolution=8)
    assert not np.allclose(y0, y2)
    scores, logits = jax.eval_shape(lambda v, x: d.apply(v, x, resolution=8), d_vars, y0)
    assert scores.shape == (4,) and logits.shape == (4, 3)
    with pytest.raises(ValueError, match="needs integer labels"):
        g.apply(g_vars, z, resolution=8)


def test_dtype_and_resolution_validation():
    g = pggan.GeneratorTiny(dtype=jnp.bfloat16)
    variables = jax.eval_shape(lambda: _init_g(g, 8))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    z = jnp.zeros((4, g.latent_dim))
    out = jax.eval_shape(lambda v: g.apply(v, z, resolution=8), variables)
    assert out.dtype == jnp.bfloat16
    for bad in (2, 12, 32):
        with pytest.raises(ValueError, match="resolution"):
            jax.eval_shape(lambda v, b=bad: g.apply(v, z, resolution=b), variables)


def test_layer_gains_follow_the_official_choices():
    """Official G_paper/D_paper gains: sqrt(2) everywhere except G's latent dense (sqrt(2)/4),
    the toRGB layers (1) and D's output dense (1)."""
    gains, net = {}, []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, layers.EqualizedDense | layers.EqualizedConv):
            gains[net[-1] + "/".join(context.module.path)] = context.module.gain
        return next_fun(*args, **kwargs)

    g, d = pggan.GeneratorTiny(), pggan.DiscriminatorTiny()
    with nn.intercept_methods(record):
        net.append("G:")
        jax.eval_shape(lambda: _init_g(g, 16))
        net.append("D:")
        jax.eval_shape(lambda: _init_d(d, 16))
    special = {
        "G:block_4x4/dense": math.sqrt(2) / 4,
        "G:to_rgb_4x4": 1.0,
        "G:to_rgb_8x8": 1.0,
        "G:to_rgb_16x16": 1.0,
        "D:block_4x4/dense1": 1.0,
    }
    # G: dense + 5 convs + 3 toRGB; D: 3 fromRGB + 5 convs + 2 dense.
    assert sum(k.startswith("G:") for k in gains) == 9
    assert sum(k.startswith("D:") for k in gains) == 10
    for path, gain in gains.items():
        assert gain == pytest.approx(special.get(path, math.sqrt(2))), path
