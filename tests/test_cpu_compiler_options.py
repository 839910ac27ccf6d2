"""The CPU compiler options (YNNPACK fusions off) change speed, not results."""

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax import parallel
from cxrjax.models import densenet


def test_options_on_cpu_only_and_user_flags_win(monkeypatch):
    options = parallel.cpu_compiler_options()
    assert options == {"xla_cpu_experimental_ynn_fusion_type": ""}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=conv")
    assert parallel.cpu_compiler_options() is None


def test_densenet_gradients_agree_with_and_without_options():
    model = densenet.DenseNetTiny(num_classes=2)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))
    variables = model.init(jax.random.key(1), x, train=False)

    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(logits**2)

    grad = jax.grad(loss)
    options = {"xla_cpu_experimental_ynn_fusion_type": ""}
    default = jax.jit(grad)(variables["params"])
    without_ynn = jax.jit(grad, compiler_options=options)(variables["params"])
    for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(without_ynn), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * float(np.abs(a).max()))
