"""BatchNorm, 1x1 convolution and pooling in the forms XLA's CPU backend runs fast: flax's layers.

The layers keep flax's variables (names, shapes, initialisation), so parameter trees,
checkpoints and `torch_import` are unchanged; outputs and gradients agree with flax's to float32
rounding (tests/models/test_cpu_friendly.py). The rewrites cost nothing on other backends.

**BatchNorm.**
XLA's CPU backend emits the reductions of training-mode BatchNorm (sum over batch, height and
width of an NHWC array, one value per channel) as loops that stride by the channel count; they
ran at about 1 GB/s and were the largest cost of a DenseNet step on this project's CPU
(benchmarks/RESULTS.md, "DenseNet121 on CPU"). The same sums as `ones[M] @ x[M, C]` run as a
GEMV, 2-5x faster, so the training-mode statistics here, forward and backward (a custom VJP,
since the autodiff of the forward would bring the strided column sums back through the
transposes of its broadcasts), go through `channel_sum`. Other backends sum directly.

`BatchNorm` keeps flax's variables (`params`: `scale`, `bias`; `batch_stats`: `mean`, `var`,
the running variance the biased batch variance) and momentum convention. The batch statistics
are two-pass (centred) in float32, and the normalised output is cast to `dtype`.

**1x1 convolution.** XLA differentiates a convolution's kernel as another convolution whose
operands it first transposes (batch and channels swapped); for DenseNet's many 1x1 convs those
transposes of small-channel activations were the largest remaining cost on CPU. `PointwiseConv`
reshapes to [B*H*W, C] and multiplies, so the kernel gradient is one GEMM, `x^T @ dy`.

**Pooling.** Max pooling's gradient through `reduce_window` is a select-and-scatter, 7x slower on
CPU than the selects of a maximum over strided views; 2x2 average pooling is a reshape-mean.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any


def channel_sum(x2: jax.Array) -> jax.Array:
    """Column sums of [M, C] in float32: a GEMV on the CPU backend, a reduction elsewhere."""
    if jax.default_backend() == "cpu":
        ones = jnp.ones((x2.shape[0],), x2.dtype)
        return jnp.matmul(ones, x2, preferred_element_type=jnp.float32)
    return jnp.sum(x2, axis=0, dtype=jnp.float32)


def _statistics(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x as [M, C] float32, per-channel mean, biased variance), two-pass."""
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    count = x2.shape[0]
    mean = channel_sum(x2) / count
    centred = x2 - mean
    return x2, mean, channel_sum(centred * centred) / count


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """Training-mode batch normalisation over all axes but the last.

    Returns (y, mean, var): y in x's dtype, the batch mean and biased variance in float32 (for
    the running averages; they carry no gradient).
    """
    return _forward(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
    x2, mean, var = _statistics(x)
    inv = jax.lax.rsqrt(var + epsilon)
    gain = inv * scale.astype(jnp.float32)
    y = (x2 * gain + (bias.astype(jnp.float32) - mean * gain)).reshape(x.shape).astype(x.dtype)
    return (y, mean, var), (x, mean, inv, scale, bias)


def _backward(epsilon, residuals, cotangents):
    del epsilon  # folded into inv
    x, mean, inv, scale, bias = residuals
    dy = cotangents[0]  # mean and var are statistics for the running averages: no gradient
    count = x.size // x.shape[-1]
    dy2 = dy.reshape(-1, x.shape[-1]).astype(jnp.float32)
    centred = x.reshape(-1, x.shape[-1]).astype(jnp.float32) - mean
    dbias = channel_sum(dy2)
    dscale = channel_sum(dy2 * centred) * inv  # sum of dy * x_hat
    gain = scale.astype(jnp.float32) * inv
    dx = dy2 * gain - centred * (gain * inv * dscale / count) - gain * dbias / count
    return (
        dx.reshape(x.shape).astype(x.dtype),
        dscale.astype(scale.dtype),
        dbias.astype(bias.dtype),
    )


normalize.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
    """`nn.BatchNorm` over the last axis (flax's variables and momentum convention)."""

    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        x = x.astype(self.dtype)
        if self.use_running_average:
            gain = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale.astype(jnp.float32)
            shift = bias.astype(jnp.float32) - ra_mean.value * gain
            return (x.astype(jnp.float32) * gain + shift).astype(self.dtype)
        y, mean, var = normalize(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
            ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
        return y


class PointwiseConv(nn.Module):
    """`nn.Conv(features, (1, 1), use_bias=False)` (NHWC, stride 1) as one matrix product."""

    features: int
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (1, 1, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        y = x.reshape(-1, x.shape[-1]) @ kernel[0, 0]
        return y.reshape(*x.shape[:-1], self.features)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch's `MaxPool2d(3, stride=2, padding=1)` (padding -inf) as the maximum of nine strided
    views: XLA's CPU backend runs the gradient of `reduce_window` max (select-and-scatter)
    7x slower than the selects this differentiates into (DenseNet's ImageNet stem). Ties split
    the gradient where select-and-scatter picks one; after the stem's ReLU, ties are zeros,
    whose gradient the ReLU stops anyway."""
    batch, height, width, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    out_h, out_w = (height - 1) // 2 + 1, (width - 1) // 2 + 1
    out = None
    for i in range(3):
        for j in range(3):
            limit = (batch, i + 2 * (out_h - 1) + 1, j + 2 * (out_w - 1) + 1, channels)
            view = jax.lax.slice(padded, (0, i, j, 0), limit, (1, 2, 2, 1))
            out = view if out is None else jnp.maximum(out, view)
    return out


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """`nn.avg_pool(x, (2, 2), strides=(2, 2))`; a reshape-mean when height and width are
    even (no `reduce_window`), flax's pooling otherwise (it drops the odd last row/column)."""
    _, height, width, _ = x.shape
    if height % 2 or width % 2:
        return nn.avg_pool(x, (2, 2), strides=(2, 2))
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
