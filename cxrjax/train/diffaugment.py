"""Differentiable augmentation for GANs on little data (Zhao et al., NeurIPS 2020).

A discriminator trained on a few images memorises them and stops giving the generator a useful
signal. DiffAugment applies the same family of random, differentiable transforms to every image
the discriminator sees, real and generated, in both players' losses, so D must judge content
that survives the transforms and G's gradient flows back through them. Pure functions of
(images [B, H, W, C] in [-1, 1], key); each image gets its own draw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

POLICIES = ("color", "translation", "cutout")


def color(images: jax.Array, key: jax.Array) -> jax.Array:
    """Brightness +-0.5, saturation (a no-op on one channel) and contrast x[0.5, 1.5]."""
    k_brightness, k_contrast = jax.random.split(key)
    b = images.shape[0]
    shift = jax.random.uniform(k_brightness, (b, 1, 1, 1), images.dtype, -0.5, 0.5)
    images = images + shift
    scale = jax.random.uniform(k_contrast, (b, 1, 1, 1), images.dtype, 0.5, 1.5)
    mean = jnp.mean(images, axis=(1, 2, 3), keepdims=True)
    return (images - mean) * scale + mean


def translation(images: jax.Array, key: jax.Array, ratio: float = 0.125) -> jax.Array:
    """Shift each image by up to `ratio` of its size, filling with zeros (the official op)."""
    b, h, w, _ = images.shape
    dy_max, dx_max = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ky, kx = jax.random.split(key)
    dy = jax.random.randint(ky, (b,), -dy_max, dy_max + 1)
    dx = jax.random.randint(kx, (b,), -dx_max, dx_max + 1)
    padded = jnp.pad(images, ((0, 0), (dy_max, dy_max), (dx_max, dx_max), (0, 0)))

    def crop(image, oy, ox):
        return jax.lax.dynamic_slice(image, (dy_max - oy, dx_max - ox, 0), (h, w, image.shape[-1]))

    return jax.vmap(crop)(padded, dy, dx)


def cutout(images: jax.Array, key: jax.Array, ratio: float = 0.5) -> jax.Array:
    """Zero one square of `ratio` x the size per image, at a random centre."""
    b, h, w, _ = images.shape
    size_y, size_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (b, 1, 1), 0, h)
    cx = jax.random.randint(kx, (b, 1, 1), 0, w)
    ys = jnp.arange(h)[None, :, None]
    xs = jnp.arange(w)[None, None, :]
    inside = (ys >= cy - size_y // 2) & (ys < cy - size_y // 2 + size_y)
    inside &= (xs >= cx - size_x // 2) & (xs < cx - size_x // 2 + size_x)
    return jnp.where(inside[..., None], 0.0, images).astype(images.dtype)


_OPS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "color": color,
    "translation": translation,
    "cutout": cutout,
}


def parse(policy: str) -> tuple[str, ...]:
    """ "translation,cutout" -> ("translation", "cutout"); "" -> () (no augmentation)."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip())
    bad = [n for n in names if n not in POLICIES]
    if bad:
        raise ValueError(f"unknown DiffAugment ops {bad}; choose from {POLICIES}")
    return names


def augment(images: jax.Array, key: jax.Array, policy: Sequence[str]) -> jax.Array:
    """Applies each op of `policy` in order, each with its own key."""
    for name, k in zip(
        policy, jax.random.split(key, max(len(policy), 1))[: len(policy)], strict=True
    ):
        images = _OPS[name](images, k)
    return images
