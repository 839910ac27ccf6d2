"""Shared building blocks: equalized-learning-rate layers and the PGGAN feature ops.

Layers follow Karras et al., "Progressive Growing of GANs" (ICLR 2018), section 4.1: weights are
stored as N(0, 1) and multiplied at run time by He's constant gain / sqrt(fan_in), so every weight
sees the same effective learning rate under Adam. Images and feature maps are NHWC.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any

# Default gain sqrt(2) gives the He constant sqrt(2 / fan_in) for LeakyReLU-followed layers.
HE_GAIN = math.sqrt(2.0)


def he_scale(fan_in: int, gain: float = HE_GAIN) -> float:
    """Run-time weight multiplier gain / sqrt(fan_in) (std of He's initializer)."""
    return gain / math.sqrt(fan_in)


def _kernel_init(use_wscale: bool, std: float):
    # With wscale the stored weight is N(0, 1) and the scale is applied in __call__; without it the
    # scale is baked into the initializer (plain He init), as in the official `use_wscale=False`.
    return nn.initializers.normal(1.0 if use_wscale else std)


class _Equalized(nn.Module, kw_only=True):
    """Fields (keyword-only) and weight handling shared by the equalized-learning-rate layers."""

    gain: float = HE_GAIN
    use_bias: bool = True
    use_wscale: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def scaled_kernel(self, x: jax.Array, shape: tuple[int, ...], fan_in: int):
        """(x, kernel) in the compute dtype, the kernel at its run-time scale."""
        scale = he_scale(fan_in, self.gain)
        kernel = self.param("kernel", _kernel_init(self.use_wscale, scale), shape, self.param_dtype)
        if self.use_wscale:
            kernel = kernel * scale
        return nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)

    def add_bias(self, y: jax.Array) -> jax.Array:
        if not self.use_bias:
            return y
        bias = self.param("bias", nn.initializers.zeros, (y.shape[-1],), self.param_dtype)
        return y + bias.astype(y.dtype)


class EqualizedDense(_Equalized):
    """Dense layer with equalized learning rate; inputs are flattened over all non-batch axes."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        x, kernel = self.scaled_kernel(x, (x.shape[-1], self.features), fan_in=x.shape[-1])
        return self.add_bias(x @ kernel)


class EqualizedConv(_Equalized):
    """Stride-1 'SAME' convolution with equalized learning rate (fan_in = kh * kw * C_in)."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        in_features = x.shape[-1]
        shape = (kh, kw, in_features, self.features)
        x, kernel = self.scaled_kernel(x, shape, fan_in=kh * kw * in_features)
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(1, 1),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return self.add_bias(y)


def leaky_relu(x: jax.Array) -> jax.Array:
    """LeakyReLU with the slope 0.2 used throughout PGGAN."""
    return jax.nn.leaky_relu(x, negative_slope=0.2)


def pixel_norm(x: jax.Array, epsilon: float = 1e-8) -> jax.Array:
    """Scale each pixel's feature vector (last axis) to unit mean square; f32 reduction for bf16."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + epsilon)
    return y.astype(x.dtype)


def minibatch_stddev(x: jax.Array, group_size: int = 4) -> jax.Array:
    """Append one feature map holding the average across-group stddev (Karras et al. sec. 3).

    The group is min(group_size, batch), as in the official code; the batch must then be a multiple
    of the group (the official reshape fails otherwise; here a ValueError says so at trace time).
    Groups are strided, again as the official reshape [G, M, ...]: example n belongs to group
    n % M with M = batch // G, so a group draws from across the whole (possibly sharded) batch.
    Statistics use the biased variance over the group plus 1e-8 under the square root, in f32.

    Args:
      x: [B, H, W, C] features.
    Returns:
      [B, H, W, C + 1].
    """
    batch, height, width, channels = x.shape
    group = min(group_size, batch)
    if batch % group:
        raise ValueError(
            f"minibatch_stddev: batch {batch} is not a multiple of group size {group}; "
            "use a batch divisible by the group size (or smaller than it)."
        )
    y = x.astype(jnp.float32).reshape(group, batch // group, height, width, channels)
    y = y - jnp.mean(y, axis=0, keepdims=True)
    y = jnp.sqrt(jnp.mean(jnp.square(y), axis=0) + 1e-8)  # [M, H, W, C]
    y = jnp.mean(y, axis=(1, 2, 3))  # [M]
    y = jnp.tile(y, group)  # [B]: example n gets the value of group n % M
    y = jnp.broadcast_to(y[:, None, None, None], (batch, height, width, 1)).astype(x.dtype)
    return jnp.concatenate([x, y], axis=-1)


def upsample2d(x: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest-neighbour upsampling of [B, H, W, C] by an integer factor."""
    if factor == 1:
        return x
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def downsample2d(x: jax.Array, factor: int = 2) -> jax.Array:
    """Box-filter (factor x factor average pool) downsampling of [B, H, W, C]."""
    if factor == 1:
        return x
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"downsample2d: {h}x{w} is not divisible by {factor}")
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return jnp.mean(x, axis=(2, 4))


def lerp(a: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
    """(1 - t) * a + t * b; written so that t = 0 and t = 1 give exactly a and b."""
    return a * (1 - t) + b * t
