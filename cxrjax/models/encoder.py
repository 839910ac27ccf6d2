"""Image -> latent encoder for f-AnoGAN (Schlegl et al., Medical Image Analysis 2019).

A small convolutional net shaped like the PGGAN discriminator run backwards into latent space:
a 1x1 "from_rgb" conv, then per resolution from the input's down to 8x8 two 3x3 convs and a 2x2
box-filter downsample, then at 4x4 one 3x3 conv, a dense hidden layer and a dense projection to
the generator's latent size. LeakyReLU 0.2 throughout, no normalisation layers (so no batch
statistics in the train state). Images are NHWC in [-1, 1], any power-of-two size >= 4.

The output is normalised like the latents the generator expects (`output`):
  "sphere"  rescaled to norm sqrt(latent_dim), the typical norm of a N(0, I) latent; PGGAN's G
            pixel-normalises its input, so this loses nothing and keeps the encoder on the
            generator's latent shell (the counterpart of f-AnoGAN's tanh for uniform latents);
  "tanh"    f-AnoGAN's original choice, for latents drawn from U(-1, 1);
  "none"    unconstrained.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cxrjax.models import layers

Dtype = Any
OUTPUTS = ("sphere", "tanh", "none")


def widths(resolution: int, base_features: int, max_features: int) -> list[int]:
    """Conv width at resolution r = input, input/2, ..., 4: doubling per halving, capped."""
    log2 = int(round(math.log2(resolution))) if resolution > 0 else -1
    if resolution != 2**log2 or resolution < 4:
        raise ValueError(f"encoder input must be a power of two >= 4 pixels, got {resolution}")
    return [min(base_features * 2**k, max_features) for k in range(log2 - 1)]


class Encoder(nn.Module):
    """E: images [B, R, R, C] in [-1, 1] -> latents [B, latent_dim] (normalised per `output`)."""

    latent_dim: int
    base_features: int = 32
    max_features: int = 256
    hidden_features: int | None = None  # 4x4 dense width; None = the 4x4 conv width
    output: str = "sphere"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if images.ndim != 4 or images.shape[1] != images.shape[2]:
            raise ValueError(f"images must be square NHWC [B, R, R, C], got {images.shape}")
        features = widths(images.shape[1], self.base_features, self.max_features)
        conv = functools.partial(nn.Conv, dtype=self.dtype, param_dtype=self.param_dtype)
        x = images.astype(self.dtype)
        x = layers.leaky_relu(conv(features[0], (1, 1), name="from_rgb")(x))
        for k, width in enumerate(features[:-1]):
            size = images.shape[1] // 2**k
            x = layers.leaky_relu(conv(width, (3, 3), name=f"block_{size}x{size}_conv0")(x))
            x = layers.leaky_relu(
                conv(features[k + 1], (3, 3), name=f"block_{size}x{size}_conv1")(x)
            )
            x = layers.downsample2d(x)
        x = layers.leaky_relu(conv(features[-1], (3, 3), name="block_4x4_conv")(x))  # [B, 4, 4, F]
        x = x.reshape(x.shape[0], -1)
        hidden = self.hidden_features or features[-1]
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.leaky_relu(dense(hidden, name="dense0")(x))
        z = dense(self.latent_dim, name="dense1")(x).astype(jnp.float32)
        if self.output == "sphere":
            return layers.pixel_norm(z)  # unit mean square over latent dims: norm sqrt(dim)
        if self.output == "tanh":
            return jnp.tanh(z)
        return z


EncoderTiny = functools.partial(Encoder, base_features=8, max_features=16)
"""Test size (~10k parameters at 8x8 with a 16-dim latent)."""
