"""DiffAugment ops: exact shifts and squares against numpy, gradients, policy parsing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.train import diffaugment


def _shift(image, dy, dx):
    """Reference: move content by (dy, dx), zero fill."""
    h, w = image.shape[:2]
    out = np.zeros_like(image)
    for y in range(h):
        for x in range(w):
            if 0 <= y - dy < h and 0 <= x - dx < w:
                out[y, x] = image[y - dy, x - dx]
    return out


def test_translation_is_a_zero_filled_shift_within_the_ratio():
    images = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype(np.float32)
    out = np.asarray(diffaugment.translation(jnp.asarray(images), jax.random.PRNGKey(3)))
    for image, moved in zip(images, out, strict=True):
        matches = [
            (dy, dx)
            for dy in range(-1, 2)
            for dx in range(-1, 2)
            if np.array_equal(_shift(image, dy, dx), moved)
        ]
        assert len(matches) == 1  # ratio 1/8 of 8 px: shifts of at most one pixel


def test_cutout_zeros_one_square_of_half_the_size_clipped_at_the_border():
    images = jnp.ones((32, 8, 8, 1))
    out = np.asarray(diffaugment.cutout(images, jax.random.PRNGKey(1)))[..., 0]
    for mask in out == 0:
        ys, xs = np.nonzero(mask)
        assert len(ys) > 0
        box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        assert box.all()  # one filled rectangle
        assert box.shape[0] <= 4 and box.shape[1] <= 4
        interior = 0 < ys.min() and ys.max() < 7 and 0 < xs.min() and xs.max() < 7
        if interior:
            assert box.shape == (4, 4)


def test_ops_are_differentiable_and_keyed():
    x = jnp.linspace(-1, 1, 2 * 8 * 8).reshape(2, 8, 8, 1)
    policy = diffaugment.parse("color,translation,cutout")
    grad = jax.grad(lambda v: jnp.sum(diffaugment.augment(v, jax.random.PRNGKey(0), policy)))(x)
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0
    a = diffaugment.augment(x, jax.random.PRNGKey(0), policy)
    b = diffaugment.augment(x, jax.random.PRNGKey(0), policy)
    c = diffaugment.augment(x, jax.random.PRNGKey(1), policy)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_parse():
    assert diffaugment.parse("") == ()
    assert diffaugment.parse(" translation, cutout ") == ("translation", "cutout")
    with pytest.raises(ValueError, match="flip"):
        diffaugment.parse("translation,flip")
