"""DenseNet: torchvision parameter counts, shapes per stem and channels, tiny train/remat/bf16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cxrjax.models import densenet


def _param_count(model, shape):
    variables = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros(shape)
    )
    return sum(x.size for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize(
    "model_cls, expected",
    [
        # torchvision.models.densenet121() / densenet169(): sum(p.numel() for p in m.parameters())
        (densenet.DenseNet121, 7_978_856),
        (densenet.DenseNet169, 14_149_480),
    ],
)
def test_param_count_matches_torchvision(model_cls, expected):
    assert _param_count(model_cls(num_classes=1000), (1, 64, 64, 3)) == expected


def test_densenet121_is_a_module_class_with_121_defaults():
    model = densenet.DenseNet121(num_classes=14)
    assert isinstance(model, densenet.DenseNet)
    assert (model.growth_rate, tuple(model.block_config), model.num_init_features) == (
        32,
        (6, 12, 24, 16),
        64,
    )
    assert (model.bn_size, model.compression, model.bn_momentum, model.bn_epsilon) == (
        4,
        0.5,
        0.9,
        1e-5,
    )
    assert model.num_features == 1024


@pytest.mark.parametrize("stem, size", [("imagenet", 64), ("small", 32)])
@pytest.mark.parametrize("channels", [1, 3])
def test_densenet121_shapes(stem, size, channels):
    model = densenet.DenseNet121(num_classes=14, stem=stem)
    x = jnp.zeros((2, size, size, channels))
    (logits, features), variables = jax.eval_shape(
        functools.partial(model.init_with_output, train=False, return_features=True),
        jax.random.key(0),
        x,
    )
    assert logits.shape == (2, 14) and logits.dtype == jnp.float32
    assert features.shape == (2, 1024) and features.dtype == jnp.float32
    params = variables["params"]
    kernel = 7 if stem == "imagenet" else 3
    assert params["conv0"]["kernel"].shape == (kernel, kernel, channels, 64)
    assert ("norm0" in params) == (stem == "imagenet")
    layer = params["denseblock3"]["denselayer24"]
    assert layer["conv1"]["kernel"].shape == (1, 1, 256 + 23 * 32, 128)
    assert layer["conv2"]["kernel"].shape == (3, 3, 128, 32)
    assert params["transition3"]["conv"]["kernel"].shape == (1, 1, 1024, 512)
    assert variables["batch_stats"]["norm5"]["mean"].shape == (1024,)


def test_unknown_stem_raises():
    with pytest.raises(ValueError, match="stem"):
        jax.eval_shape(
            functools.partial(densenet.DenseNetTiny(stem="cifar").init, train=False),
            jax.random.key(0),
            jnp.zeros((1, 32, 32, 1)),
        )


def _init(model, x, rng):
    # Jitted: eager init dispatches (and compiles) op by op, ~3x slower here.
    return jax.jit(functools.partial(model.init, train=False))(rng, x)


def _images(n=4, size=32, channels=1):
    return jax.random.normal(jax.random.key(1), (n, size, size, channels))


def _train_loss_fn(model, x, labels):
    def loss_fn(params, batch_stats, rngs):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs=rngs,
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updates["batch_stats"])

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def test_tiny_train_step_updates_batch_stats_and_has_gradients(rng):
    model = densenet.DenseNetTiny(num_classes=3)
    x, labels = _images(), jnp.array([0, 1, 2, 0])
    variables = _init(model, x, rng)
    (loss, (logits, new_stats)), grads = _train_loss_fn(model, x, labels)(
        variables["params"], variables["batch_stats"], {}
    )
    assert logits.shape == (4, 3) and np.isfinite(float(loss))
    # Running stats move from their (0, 1) init towards the batch statistics.
    old, new = variables["batch_stats"]["norm5"], new_stats["norm5"]
    assert not np.allclose(old["mean"], new["mean"]) and not np.allclose(old["var"], new["var"])
    # Every parameter gets a gradient, the stem included.
    norms = jax.tree.map(lambda g: float(jnp.abs(g).sum()), grads)
    assert all(n > 0 for n in jax.tree.leaves(norms)), norms
    # Eval mode uses the running stats: a different function of x than train mode.
    eval_logits = model.apply(
        {"params": variables["params"], "batch_stats": new_stats}, x, train=False
    )
    assert not np.allclose(eval_logits, logits, atol=1e-4)


def test_remat_matches_plain_with_batchnorm_and_dropout(rng):
    x, labels = _images(), jnp.array([0, 1, 2, 0])
    rngs = {"dropout": jax.random.key(7)}
    results = []
    for remat in (False, True):
        model = densenet.DenseNetTiny(num_classes=3, remat=remat, dropout_rate=0.2)
        variables = _init(model, x, rng)
        out = _train_loss_fn(model, x, labels)(variables["params"], variables["batch_stats"], rngs)
        results.append((variables, out))
    (vars_plain, out_plain), (vars_remat, out_remat) = results
    # Same names, so the same init; then identical loss, logits, new batch_stats and grads.
    jax.tree.map(np.testing.assert_array_equal, vars_plain, vars_remat)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6), out_plain, out_remat)


def test_dropout_only_in_train_mode(rng):
    model = densenet.DenseNetTiny(num_classes=3, dropout_rate=0.5)
    x = _images()
    variables = _init(model, x, rng)
    apply = jax.jit(
        lambda key: model.apply(
            variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
        )[0]
    )
    assert not np.allclose(apply(jax.random.key(1)), apply(jax.random.key(2)))
    eval_fn = jax.jit(lambda: model.apply(variables, x, train=False))
    np.testing.assert_array_equal(eval_fn(), eval_fn())


def test_bfloat16_compute_returns_float32(rng):
    x = _images(channels=3)
    fp32 = densenet.DenseNetTiny(num_classes=3)
    bf16 = densenet.DenseNetTiny(num_classes=3, dtype=jnp.bfloat16)
    variables = _init(bf16, x, rng)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    apply = lambda m: jax.jit(functools.partial(m.apply, train=False, return_features=True))
    logits, features = apply(bf16)(variables, x)
    ref_logits, _ = apply(fp32)(variables, x)
    assert logits.dtype == jnp.float32 and features.dtype == jnp.float32
    # Close to the fp32 result but not equal: the computation really ran in bfloat16.
    np.testing.assert_allclose(logits, ref_logits, atol=0.1, rtol=0.1)
    assert not np.array_equal(logits, ref_logits)


def test_features_method_matches_return_features(rng):
    model = densenet.DenseNetTiny(num_classes=3)
    x = _images()
    variables = _init(model, x, rng)
    features = jax.jit(lambda v: model.apply(v, x, method="features"))(variables)
    logits, ref = jax.jit(lambda v: model.apply(v, x, train=False, return_features=True))(variables)
    assert features.shape == (4, model.num_features) == (4, 32)
    np.testing.assert_array_equal(features, ref)
    # The logits are the classifier applied to exactly these features.
    head = variables["params"]["classifier"]
    np.testing.assert_allclose(logits, features @ head["kernel"] + head["bias"], atol=1e-5)
