"""The DDPM noise-prediction UNet (Ho et al. 2020), grayscale and optionally class-conditional.

Architecture follows the paper's reference model: sinusoidal time embedding -> 2-layer MLP;
per resolution `num_res_blocks` residual blocks (GroupNorm, swish, dropout, a per-block projection
of the time embedding) with single-head self-attention where the feature map side is in
`attn_resolutions`; a strided-conv downsample between levels; a middle res/attn/res stack; and a
mirrored up path with skip concatenation and nearest-neighbour + conv upsampling.

Class conditioning: a table of `num_classes + 1` embeddings added to the time embedding; the last
row (`null_id == num_classes`) is the "no label" token, so a model trained with label dropout
(`cxrjax.diffusion.drop_labels`) also predicts unconditionally and supports classifier-free
guidance. `num_classes=0` builds an unconditional model with no label table.

Inputs: x [B, H, W, in_channels] in [-1, 1] (NHWC), t [B] timestep indices in [0, T), labels [B]
int or None. Output: [B, H, W, out_channels] float32 (the predicted noise, or v).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal features of (possibly fractional) timesteps, [B] -> [B, dim] float32.

    Geometric frequencies from 1 down to 1/max_period, as in the Transformer position code, so
    nearby timesteps get similar embeddings and the MLP can read off coarse and fine time.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:  # odd widths: pad so the MLP input width is exactly `dim`
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-swish-conv twice, with the time embedding added between the convolutions.

    The second conv starts at zero so every block is the identity at init (as in the reference),
    which keeps deep UNets trainable without warm-up tricks.
    """

    out_channels: int
    dropout: float
    deterministic: bool  # a field, not a call argument, so nn.remat needs no static_argnums
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        conv = functools.partial(nn.Conv, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(
            nn.GroupNorm, num_groups=self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype
        )
        h = nn.swish(norm(name="norm1")(x))
        h = conv(self.out_channels, (3, 3), name="conv1")(h)
        # Per-block time projection: [B, temb] -> [B, 1, 1, C], a per-channel bias.
        temb_proj = nn.Dense(
            self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="temb_proj"
        )
        h = h + temb_proj(nn.swish(temb))[:, None, None, :]
        h = nn.swish(norm(name="norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        h = conv(self.out_channels, (3, 3), kernel_init=nn.initializers.zeros, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, (1, 1), name="skip")(x)
        return x + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over all H*W positions, residual, output projection zero-init."""

    num_heads: int = 1
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"{c} channels do not split into {self.num_heads} heads")
        dense = functools.partial(nn.DenseGeneral, dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.GroupNorm(
            num_groups=self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype, name="norm"
        )(x)
        h = h.reshape(b, hgt * wid, c)
        head_dim = c // self.num_heads
        q, k, v = (dense((self.num_heads, head_dim), name=n)(h) for n in ("q", "k", "v"))
        # Logits and softmax in float32: bf16 logits over 256+ tokens lose the small weights.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits / math.sqrt(head_dim), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        out = dense(c, axis=(-2, -1), kernel_init=nn.initializers.zeros, name="proj_out")(out)
        return x + out.reshape(b, hgt, wid, c)


class UNet(nn.Module):
    """DDPM UNet; see the module docstring for shapes, ranges and the label convention."""

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)  # feature-map sides that get self-attention
    dropout: float = 0.1
    in_channels: int = 1
    out_channels: int = 1
    num_classes: int = 0  # 0: unconditional; else labels in [0, num_classes), null = num_classes
    num_heads: int = 1
    num_groups: int = 32
    remat: bool = False  # rematerialise res blocks: less activation memory, ~1/3 more compute
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def null_id(self) -> int:
        """Label id meaning "no class" (the classifier-free-guidance unconditional branch)."""
        return self.num_classes

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, labels: jax.Array | None = None, *, train: bool
    ) -> jax.Array:
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape}")
        if x.shape[1] % 2 ** (len(self.ch_mult) - 1) or x.shape[2] % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"{x.shape[1:3]} is not divisible by 2^{len(self.ch_mult) - 1}")
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        conv = functools.partial(nn.Conv, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(
            nn.GroupNorm, num_groups=self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype
        )
        block_cls = nn.remat(ResBlock) if self.remat else ResBlock
        res_block = functools.partial(
            block_cls,
            dropout=self.dropout,
            deterministic=not train,
            num_groups=self.num_groups,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        attn_block = functools.partial(
            AttnBlock,
            num_heads=self.num_heads,
            num_groups=self.num_groups,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

        temb_dim = 4 * self.ch
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        temb = dense(temb_dim, name="temb_dense0")(timestep_embedding(t, self.ch))
        temb = dense(temb_dim, name="temb_dense1")(nn.swish(temb))
        if self.num_classes > 0:
            if labels is None:
                labels = jnp.full((x.shape[0],), self.null_id, jnp.int32)
            temb = temb + nn.Embed(
                self.num_classes + 1,
                temb_dim,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="label_emb",
            )(labels)
        elif labels is not None:
            raise ValueError("labels given to an unconditional UNet (num_classes=0)")

        # Down path; `hs` keeps every activation the up path concatenates back.
        hs = [conv(self.ch, (3, 3), name="conv_in")(x.astype(self.dtype))]
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = res_block(self.ch * mult, name=f"down{level}_res{i}")(hs[-1], temb)
                if h.shape[1] in self.attn_resolutions:
                    h = attn_block(name=f"down{level}_attn{i}")(h)
                hs.append(h)
            if level != len(self.ch_mult) - 1:
                downsample = conv(
                    hs[-1].shape[-1], (3, 3), strides=(2, 2), name=f"down{level}_down"
                )
                hs.append(downsample(hs[-1]))

        h = hs[-1]
        h = res_block(h.shape[-1], name="mid_res0")(h, temb)
        h = attn_block(name="mid_attn")(h)
        h = res_block(h.shape[-1], name="mid_res1")(h, temb)

        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = res_block(self.ch * mult, name=f"up{level}_res{i}")(h, temb)
                if h.shape[1] in self.attn_resolutions:
                    h = attn_block(name=f"up{level}_attn{i}")(h)
            if level != 0:
                b, hgt, wid, c = h.shape
                h = jax.image.resize(h, (b, 2 * hgt, 2 * wid, c), method="nearest")
                h = conv(c, (3, 3), name=f"up{level}_up")(h)
        assert not hs, "skip connections left unused"

        h = nn.swish(norm(name="norm_out")(h))
        h = conv(self.out_channels, (3, 3), kernel_init=nn.initializers.zeros, name="conv_out")(h)
        return h.astype(jnp.float32)  # losses and samplers work in float32 whatever the dtype


# Ho et al.'s CIFAR-10 model (35.7 M params at 3 channels), here for 32x32 grayscale.
# Measured on one H200 (jax 0.11.2), batch 128, Adam train step: fp32 39 ms, 5.3 GiB peak;
# bf16 25 ms, 3.0 GiB; bf16 + remat 29 ms, 2.2 GiB. 50 guided DDIM steps, batch 256: 0.9 s.
unet_cifar32 = functools.partial(
    UNet, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1
)
# Ho et al.'s 256x256 model (LSUN / CelebA-HQ, 114 M params at 3 channels; no dropout).
# Measured on one H200, bf16, batch 8: 51 ms per train step, 7.2 GiB peak.
unet_256 = functools.partial(
    UNet, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0
)
# The same family one level shallower for 128x128 (bottleneck stays 8x8, attention at 16x16).
unet_128 = functools.partial(
    UNet, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0
)
# 32x32 model small enough (1.6 M params) to train for demos on a CPU.
unet_demo32 = functools.partial(
    UNet,
    ch=32,
    ch_mult=(1, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(16,),
    dropout=0.1,
    num_groups=8,
)
# 28x28 (the PneumoniaMNIST native size: 28 -> 14 -> 7), 1.1 M params, attention at 7x7 only:
# about twice as fast per step on a CPU as unet_demo32 and reaches class-faithful samples of the
# scarce class in a few hundred steps with class-balanced batches (benchmarks/RESULTS.md).
unet_demo28 = functools.partial(
    UNet,
    ch=32,
    ch_mult=(1, 2, 2),
    num_res_blocks=1,
    attn_resolutions=(7,),
    dropout=0.0,
    num_groups=8,
)
# For tests: 8x8 or 16x16 inputs, attention at 4x4, compiles in seconds on CPU.
unet_tiny = functools.partial(
    UNet, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, num_groups=4
)


def make_apply_fn(model: UNet) -> Callable[..., jax.Array]:
    """Training-mode `apply_fn(params, x_t, t, labels, rng)` for `diffusion.diffusion_loss`."""

    def apply_fn(params, x_t, t, labels, rng):
        return model.apply({"params": params}, x_t, t, labels, train=True, rngs={"dropout": rng})

    return apply_fn


def make_model_fn(model: UNet, params: Any) -> Callable[..., jax.Array]:
    """Eval-mode `model_fn(x_t, t, labels)` for the samplers; call it inside the jitted sampler."""

    def model_fn(x_t, t, labels):
        return model.apply({"params": params}, x_t, t, labels, train=False)

    return model_fn
