"""UNet: parameter counts against Ho et al., shapes, dtypes, labels, remat and dropout.

Full-size models are only traced (jax.eval_shape); numerics use a shrunken tiny variant.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.models import unet


def _abstract_params(model, hw, batch=1):
    x = jnp.zeros((batch, hw, hw, model.in_channels))
    t = jnp.zeros((batch,), jnp.int32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x, t)


def _count(tree):
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


# Measured here (eval_shape), 1 input and 1 output channel unless noted. Pinned so an
# architecture change is a visible decision.
MEASURED = {
    "unet_cifar32": (unet.unet_cifar32, 32, 35_741_697),
    "unet_128": (unet.unet_128, 128, 71_432_193),
    "unet_256": (unet.unet_256, 256, 113_668_609),
    "unet_demo32": (unet.unet_demo32, 32, 1_623_169),
    "unet_tiny": (unet.unet_tiny, 8, 176_849),
}


@pytest.mark.parametrize("name", sorted(MEASURED))
def test_preset_param_counts_and_output_shapes(name):
    make, hw, expected = MEASURED[name]
    model = make()
    variables = _abstract_params(model, hw, batch=2)
    assert set(variables) == {"params"}  # GroupNorm only: no batch statistics to carry
    assert _count(variables) == expected
    out = jax.eval_shape(
        functools.partial(model.apply, train=False),
        variables,
        jnp.zeros((2, hw, hw, 1)),
        jnp.zeros((2,), jnp.int32),
    )
    assert out.shape == (2, hw, hw, 1) and out.dtype == jnp.float32


def test_cifar_and_256_match_ho_et_al_reference_counts():
    """Ho et al. report 35.7 M (CIFAR-10) and 114 M (256x256) parameters for RGB models.

    With in/out channels 3 ours give 35,746,307 and 113,673,219 (well within rounding). Grayscale
    removes exactly 2 input channels from conv_in (2 * 3*3*128 weights) and 2 output channels
    from conv_out (2 * 3*3*128 weights + 2 biases) = 4,610 parameters.
    """
    rgb = _count(_abstract_params(unet.unet_cifar32(in_channels=3, out_channels=3), 32))
    assert rgb == pytest.approx(35.7e6, rel=2e-3)
    assert rgb - MEASURED["unet_cifar32"][2] == 2 * 9 * 128 + 2 * 9 * 128 + 2
    rgb256 = _count(_abstract_params(unet.unet_256(in_channels=3, out_channels=3), 256))
    assert rgb256 == pytest.approx(114e6, rel=5e-3)
    # Class conditioning adds one (num_classes + 1) x 4ch embedding table and nothing else.
    cond = _count(_abstract_params(unet.unet_cifar32(num_classes=2), 32))
    assert cond - MEASURED["unet_cifar32"][2] == 3 * 512


def test_bf16_compute_fp32_params_and_output():
    model = unet.unet_tiny(dtype=jnp.bfloat16)
    variables = _abstract_params(model, 8)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    apply = functools.partial(model.apply, train=False)
    assert jax.eval_shape(apply, variables, x, t).dtype == jnp.float32
    jaxpr = str(jax.make_jaxpr(apply)(variables, x, t))
    assert "conv_general_dilated" in jaxpr and "bf16[1,8,8,16]" in jaxpr  # convs run in bf16
    half = _abstract_params(unet.unet_tiny(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), 8)
    assert {leaf.dtype for leaf in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}


def test_label_table_and_unconditional_model():
    params = _abstract_params(unet.unet_tiny(num_classes=3), 8)["params"]
    assert params["label_emb"]["embedding"].shape == (4, 4 * 16)  # 3 classes + null
    assert unet.unet_tiny(num_classes=3).null_id == 3
    uncond = unet.unet_tiny()
    assert "label_emb" not in _abstract_params(uncond, 8)["params"]
    with pytest.raises(ValueError, match="unconditional"):
        jax.eval_shape(
            functools.partial(uncond.init, train=False),
            jax.random.key(0),
            jnp.zeros((1, 8, 8, 1)),
            jnp.zeros(1),
            jnp.zeros(1, jnp.int32),
        )


def test_rejects_bad_inputs():
    init = functools.partial(unet.unet_tiny().init, train=False)
    with pytest.raises(ValueError, match="channels"):
        jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros(1))
    with pytest.raises(ValueError, match="divisible"):
        jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 9, 9, 1)), jnp.zeros(1))


def test_timestep_embedding():
    emb = unet.timestep_embedding(jnp.array([0, 1, 500]), 8)
    assert emb.shape == (3, 8)
    np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(emb[1, 0], np.sin(1.0), rtol=1e-6)  # highest frequency is 1
    assert unet.timestep_embedding(jnp.array([3]), 7).shape == (1, 7)


# ------------------------------------------------------------------ numerics on a micro UNet

# One level and narrow: a quarter of unet_tiny's ops, so each compile takes a few seconds here.
MICRO = dict(ch=8, ch_mult=(1,), num_groups=2, num_classes=3, dropout=0.5)


@pytest.fixture(scope="module")
def micro():
    """Micro UNet with random (not zero-init) weights so every path affects the output.

    numpy noise: eager jax.random per leaf would compile once per leaf shape.
    """
    model = unet.unet_tiny(**MICRO)
    gen = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: 0.3 * gen.standard_normal(s.shape, np.float32),
        _abstract_params(model, 8)["params"],
    )
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    return model, params, x


def test_labels_time_and_null_path(micro):
    model, params, x = micro
    x = jnp.concatenate([x[:1]] * 4)  # one image, four (t, label) settings
    t = jnp.array([5, 5, 5, 600])
    labels = jnp.array([0, 2, 3, 0])  # 3 = null

    @jax.jit
    def run(params):
        apply = functools.partial(model.apply, {"params": params}, x, t, train=False)
        return apply(labels), apply(None)

    out, unlabelled = run(params)
    np.testing.assert_allclose(unlabelled[2], out[2], rtol=1e-6, atol=1e-6)  # None is null
    assert not np.allclose(out[0], out[1], atol=1e-3)  # label changes the output
    assert not np.allclose(out[0], out[2], atol=1e-3)  # conditional differs from null
    assert not np.allclose(out[0], out[3], atol=1e-3)  # time changes the output


def test_remat_changes_memory_not_math(micro):
    model, params, x = micro
    remat_model = unet.unet_tiny(**MICRO, remat=True)
    remat_tree = jax.tree.structure(_abstract_params(remat_model, 8)["params"])
    assert remat_tree == jax.tree.structure(params)  # checkpoints stay interchangeable
    t, labels, rng = jnp.array([1, 50, 300, 900]), jnp.array([0, 2, 3, 1]), jax.random.key(3)

    def loss(m, p):
        out = m.apply({"params": p}, x, t, labels, train=True, rngs={"dropout": rng})
        return jnp.mean(out**2)

    grads = jax.jit(
        lambda p: (
            jax.grad(functools.partial(loss, model))(p),
            jax.grad(functools.partial(loss, remat_model))(p),
        )
    )
    plain, remat = grads(params)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain)) > 0


def test_dropout_only_in_training(micro):
    model, params, x = micro
    x = jnp.concatenate([x[:1]] * 2)  # identical rows: only dropout can tell them apart
    t = jnp.array([1, 1])

    @jax.jit
    def run(params):
        variables = {"params": params}
        train = model.apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(0)})
        return train, model.apply(variables, x, t, train=False)

    train, evaluated = run(params)
    assert not np.allclose(train[0], train[1], atol=1e-3)
    np.testing.assert_allclose(evaluated[0], evaluated[1], rtol=1e-6, atol=1e-6)
    assert not np.allclose(train[0], evaluated[0], atol=1e-3)
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(functools.partial(model.apply, train=True), {"params": params}, x, t)
