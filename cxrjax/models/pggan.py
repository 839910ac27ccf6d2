"""Progressive GAN generator and discriminator (Karras et al., ICLR 2018) for grayscale CXRs.

Faithful to the official architecture (tkarras/progressive_growing_of_gans, `G_paper`/`D_paper`):
equalized learning rate, pixelwise feature normalization in G, minibatch stddev in D, LeakyReLU
0.2, nearest-neighbour upsampling and box-filter downsampling (the unfused forms; the official
fused conv variants compute the same function with the same parameters).

Designed for JAX: one parameter tree holds every block up to `max_resolution`, whatever resolution
`init` is called at, so optimizer state and checkpoint structure never change while growing. The
current `resolution` is a static argument (one compile per stage) and the fade-in `alpha` is traced
(changing it never recompiles). Images are NHWC in [-1, 1] (G's output is linear, not clipped).

Parameter names: `block_{r}x{r}` is the block working at r x r (G: the block that produces r x r;
D: the block that consumes r x r; `block_4x4` is G's latent stem / D's output head),
`to_rgb_{r}x{r}` / `from_rgb_{r}x{r}` are the 1x1 image layers.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cxrjax.models import layers

Dtype = Any


def num_features(stage: int, fmap_base: int, fmap_decay: float, fmap_max: int) -> int:
    """Official feature-map count nf(stage) = min(int(fmap_base / 2**(stage*fmap_decay)), fmap_max).

    Stage s = log2(resolution) - 1 is the width of the block at resolution 2**(s + 1).
    """
    return min(int(fmap_base / (2.0 ** (stage * fmap_decay))), fmap_max)


def _log2(resolution: int, max_resolution: int) -> int:
    """Validates a static resolution and returns its log2."""
    log2 = int(round(math.log2(resolution))) if resolution > 0 else -1
    if resolution != 2**log2 or not 4 <= resolution <= max_resolution:
        raise ValueError(
            f"resolution must be a power of two in [4, {max_resolution}], got {resolution}"
        )
    return log2


def _check_max_resolution(max_resolution: int) -> int:
    log2 = int(round(math.log2(max_resolution))) if max_resolution > 0 else -1
    if max_resolution != 2**log2 or not 8 <= max_resolution <= 1024:
        raise ValueError(
            f"max_resolution must be a power of two in [8, 1024], got {max_resolution}"
        )
    return log2


def _name(prefix: str, log2: int) -> str:
    return f"{prefix}_{2**log2}x{2**log2}"


def _fade_alpha(alpha: Any, dtype: Dtype) -> jax.Array:
    # Clipped as the official lerp_clip, so an overshooting schedule cannot extrapolate.
    return jnp.clip(jnp.asarray(alpha, jnp.float32), 0.0, 1.0).astype(dtype)


def fade_in_reals(images: jax.Array, alpha: Any) -> jax.Array:
    """Blend reals with their 2x-blurred self so D sees the same mix G produces during a fade.

    Returns lerp(upsample(downsample(images)), images, alpha): alpha = 0 gives the previous
    resolution's content (nearest-upsampled), alpha = 1 the images unchanged.
    """
    coarse = layers.upsample2d(layers.downsample2d(images))
    return layers.lerp(coarse, images, _fade_alpha(alpha, images.dtype))


def resize_reals(images: jax.Array, resolution: int) -> jax.Array:
    """Box-filter full-resolution reals [B, H, W, C] down to the current training resolution."""
    factor = images.shape[1] // resolution
    if factor * resolution != images.shape[1] or factor & (factor - 1):
        raise ValueError(f"cannot box-downsample {images.shape[1]} to {resolution}")
    return layers.downsample2d(images, factor)


class _Config(nn.Module):
    """Fields shared by G and D (mirroring the official G_paper / D_paper keyword arguments)."""

    max_resolution: int = 32
    num_channels: int = 1
    num_classes: int = 0
    fmap_base: int = 8192
    fmap_decay: float = 1.0
    fmap_max: int = 512
    use_wscale: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def nf(self, stage: int) -> int:
        return num_features(stage, self.fmap_base, self.fmap_decay, self.fmap_max)

    def shared(self) -> dict[str, Any]:
        """These shared fields' values, for the blocks G and D build."""
        return {name: getattr(self, name) for name in _CONFIG_FIELDS}

    def _conv(self, features: int, kernel: int, name: str, gain: float = layers.HE_GAIN):
        return layers.EqualizedConv(
            features,
            (kernel, kernel),
            gain=gain,
            use_wscale=self.use_wscale,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _dense(self, features: int, name: str, gain: float = layers.HE_GAIN, use_bias=True):
        return layers.EqualizedDense(
            features,
            gain=gain,
            use_bias=use_bias,
            use_wscale=self.use_wscale,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )


_CONFIG_FIELDS = tuple(
    f.name for f in dataclasses.fields(_Config) if f.name not in ("parent", "name")
)


class GeneratorStem(_Config):
    """4x4 block: (normalized) latent -> dense to 4x4 x nf(1) -> conv 3x3."""

    use_pixelnorm: bool = True

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        nf1 = self.nf(1)
        pn = layers.pixel_norm if self.use_pixelnorm else (lambda v: v)
        # Official gain sqrt(2)/4 for this layer (kept from the original Theano code); the bias is
        # per channel, added after the reshape to 4x4, hence no bias inside the dense.
        x = self._dense(nf1 * 16, "dense", gain=layers.HE_GAIN / 4, use_bias=False)(z)
        x = x.reshape(x.shape[0], 4, 4, nf1)
        bias = self.param("bias", nn.initializers.zeros, (nf1,), self.param_dtype)
        x = pn(layers.leaky_relu(x + bias.astype(x.dtype)))
        return pn(layers.leaky_relu(self._conv(nf1, 3, "conv")(x)))


class GeneratorBlock(_Config):
    """Block producing resolution 2**log2: upsample 2x, conv 3x3, conv 3x3 (nf(log2 - 1) maps)."""

    log2: int = 3
    use_pixelnorm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pn = layers.pixel_norm if self.use_pixelnorm else (lambda v: v)
        features = self.nf(self.log2 - 1)
        x = layers.upsample2d(x)
        x = pn(layers.leaky_relu(self._conv(features, 3, "conv0")(x)))
        return pn(layers.leaky_relu(self._conv(features, 3, "conv1")(x)))


class Generator(_Config):
    """PGGAN generator: latents [B, latent_size] (+ int labels [B]) -> images [B, r, r, C].

    Conditional (num_classes > 0): the one-hot label is concatenated to the latent before the
    input normalization, as the official code does. Unconditional models ignore `labels`.
    `latent_size=None` means nf(0), the official default (512 at fmap_base 8192, fmap_max 512).
    """

    latent_size: int | None = None
    normalize_latents: bool = True
    use_pixelnorm: bool = True

    @property
    def latent_dim(self) -> int:
        return self.latent_size if self.latent_size is not None else self.nf(0)

    @nn.compact
    def __call__(
        self,
        latents: jax.Array,
        labels: jax.Array | None = None,
        *,
        resolution: int,
        alpha: Any = 1.0,
    ) -> jax.Array:
        """Generates at `resolution` (static); alpha in [0, 1] fades in the newest block.

        Output = lerp(upsample(to_rgb_prev(h_prev)), to_rgb(block(h_prev)), alpha); at the 4x4
        stage alpha has no effect.
        """
        max_log2 = _check_max_resolution(self.max_resolution)
        top = _log2(resolution, self.max_resolution)
        if latents.shape[-1] != self.latent_dim:
            raise ValueError(f"latents have {latents.shape[-1]} dims, expected {self.latent_dim}")
        x = latents.astype(self.dtype)
        if self.num_classes > 0:
            if labels is None:
                raise ValueError("a conditional generator needs integer labels [B]")
            x = jnp.concatenate([x, jax.nn.one_hot(labels, self.num_classes, dtype=x.dtype)], -1)
        if self.normalize_latents:
            x = layers.pixel_norm(x)

        common = dict(self.shared(), use_pixelnorm=self.use_pixelnorm)
        blocks = {2: GeneratorStem(**common, name=_name("block", 2))}
        for k in range(3, max_log2 + 1):
            blocks[k] = GeneratorBlock(**common, log2=k, name=_name("block", k))
        to_rgb = {
            k: self._conv(self.num_channels, 1, _name("to_rgb", k), gain=1.0)
            for k in range(2, max_log2 + 1)
        }
        if self.is_initializing():
            # Create every block's parameters, not only those on this resolution's path, so the
            # tree is the same whatever resolution init was called at. Tiny dummies keep it cheap.
            for k in range(3, max_log2 + 1):
                blocks[k](jnp.zeros((1, 1, 1, self.nf(k - 2)), self.dtype))
            for k in range(2, max_log2 + 1):
                to_rgb[k](jnp.zeros((1, 1, 1, self.nf(k - 1)), self.dtype))

        h = blocks[2](x)  # [B, 4, 4, nf(1)]
        h_prev = h
        for k in range(3, top + 1):
            h_prev, h = h, blocks[k](h)
        images = to_rgb[top](h)
        if top > 2:
            old = layers.upsample2d(to_rgb[top - 1](h_prev))
            images = layers.lerp(old, images, _fade_alpha(alpha, images.dtype))
        return images


class DiscriminatorBlock(_Config):
    """Block consuming resolution 2**log2: conv3x3 (nf(log2-1)), conv3x3 (nf(log2-2)), pool 2x2."""

    log2: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = layers.leaky_relu(self._conv(self.nf(self.log2 - 1), 3, "conv0")(x))
        x = layers.leaky_relu(self._conv(self.nf(self.log2 - 2), 3, "conv1")(x))
        return layers.downsample2d(x)


class DiscriminatorHead(_Config):
    """4x4 block: minibatch stddev, conv 3x3 (nf(1)), dense nf(0), dense 1 + num_classes."""

    mbstd_group_size: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.mbstd_group_size > 1:
            x = layers.minibatch_stddev(x, self.mbstd_group_size)
        x = layers.leaky_relu(self._conv(self.nf(1), 3, "conv")(x))
        x = layers.leaky_relu(self._dense(self.nf(0), "dense0")(x))
        return self._dense(1 + self.num_classes, "dense1", gain=1.0)(x)


class Discriminator(_Config):
    """PGGAN discriminator: images [B, r, r, C] -> (scores [B], class_logits [B, num_classes]).

    The AC-GAN head is the official one: the last dense has 1 + num_classes outputs, the first is
    the WGAN critic score, the rest are class logits (shape [B, 0] when unconditional). `labels`
    is accepted for a call signature uniform with G and is unused: AC-GAN's D predicts labels
    rather than conditioning on them. `mbstd_group_size` <= 1 disables minibatch stddev.
    """

    mbstd_group_size: int = 4

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        labels: jax.Array | None = None,
        *,
        resolution: int,
        alpha: Any = 1.0,
    ) -> tuple[jax.Array, jax.Array]:
        """Scores `images` at `resolution` (static); alpha in [0, 1] fades in the newest block.

        Features entering the lower blocks = lerp(from_rgb_prev(downsample(images)),
        block(from_rgb(images)), alpha), the mirror of G's fade.
        """
        del labels
        max_log2 = _check_max_resolution(self.max_resolution)
        top = _log2(resolution, self.max_resolution)
        if images.shape[1:3] != (resolution, resolution):
            raise ValueError(f"images {images.shape} do not match resolution {resolution}")
        images = images.astype(self.dtype)
        common = self.shared()
        head = DiscriminatorHead(
            **common, mbstd_group_size=self.mbstd_group_size, name=_name("block", 2)
        )
        blocks = {
            k: DiscriminatorBlock(**common, log2=k, name=_name("block", k))
            for k in range(3, max_log2 + 1)
        }
        # from_rgb convs are followed by LeakyReLU, as in the official code.
        from_rgb_convs = {
            k: self._conv(self.nf(k - 1), 1, _name("from_rgb", k)) for k in range(2, max_log2 + 1)
        }

        def from_rgb(k, x):
            return layers.leaky_relu(from_rgb_convs[k](x))

        if self.is_initializing():
            # See Generator: build the full tree whatever resolution init was called at.
            for k in range(3, max_log2 + 1):
                blocks[k](jnp.zeros((1, 2, 2, self.nf(k - 1)), self.dtype))
            for k in range(2, max_log2 + 1):
                from_rgb(k, jnp.zeros((1, 1, 1, self.num_channels), self.dtype))

        h = from_rgb(top, images)
        if top > 2:
            h = blocks[top](h)
            old = from_rgb(top - 1, layers.downsample2d(images))
            h = layers.lerp(old, h, _fade_alpha(alpha, h.dtype))
            for k in range(top - 1, 2, -1):
                h = blocks[k](h)
        out = head(h)  # [B, 1 + num_classes]
        return out[:, 0], out[:, 1:]


# Presets. Pair a G and a D preset of the same name; override e.g. num_classes at the call site.
OFFICIAL_1024 = dict(max_resolution=1024, fmap_base=8192, fmap_max=512)
"""Official paper architecture at 1024x1024 (latent 512; 23.1M params per net for RGB, Table 2)."""
DEMO_32 = dict(max_resolution=32, fmap_base=1024, fmap_max=128)
"""CPU demo for 32x32 CXRs: widths 128,128,128,64 at 4..32, latent 128 (~1.1M params per net)."""
TINY = dict(max_resolution=16, fmap_base=64, fmap_max=16)
"""Test size: widths 16,16,8 at 4..16, latent 16 (~13k params per net)."""

GeneratorOfficial1024 = functools.partial(Generator, **OFFICIAL_1024)
DiscriminatorOfficial1024 = functools.partial(Discriminator, **OFFICIAL_1024)
GeneratorDemo32 = functools.partial(Generator, **DEMO_32)
DiscriminatorDemo32 = functools.partial(Discriminator, **DEMO_32)
GeneratorTiny = functools.partial(Generator, **TINY)
DiscriminatorTiny = functools.partial(Discriminator, mbstd_group_size=2, **TINY)
