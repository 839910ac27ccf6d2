"""Image decode / resize / encode shared by the TFDS builders and the Grain transforms.

One place defines how a file becomes the stored uint8 grayscale image, so every dataset is
prepared the same way: decode -> grayscale -> center crop to a square -> antialiased resize.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError


class CorruptImageError(ValueError):
    """An image that cannot be decoded; the message names its file or record."""


def decode_gray(data: bytes | np.ndarray, name: str = "<bytes>") -> np.ndarray:
    """Decodes PNG/JPEG bytes (or passes through an array) to uint8 [H, W] grayscale.

    RGB, RGBA, palette and 16-bit images are converted with PIL's ITU-R 601-2 luma transform.
    Raises CorruptImageError naming `name` when the bytes are not a complete image.
    """
    if isinstance(data, np.ndarray):
        array = data[..., 0] if data.ndim == 3 else data
        if array.dtype != np.uint8:
            raise CorruptImageError(f"{name}: expected uint8 pixels, got {array.dtype}")
        return array
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # Forces a full decode: truncated files fail here, not later.
            if image.mode in ("I;16", "I;16B", "I", "F"):
                # 16-bit PNGs (some NIH exports): scale to 8 bits rather than clip.
                array = np.asarray(image, dtype=np.float64)
                peak = array.max() if array.size else 1.0
                scale = 255.0 / (65535.0 if peak > 255 else 255.0)
                return np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
            return np.asarray(image.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise CorruptImageError(f"{name}: not a readable image ({error})") from error


def center_crop_square(image: np.ndarray) -> np.ndarray:
    """Crops the central square of an [H, W] image (the shorter side is kept whole)."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top : top + side, left : left + side]


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Center-crops to a square, then resizes to [size, size] with an antialiased filter.

    PIL's BICUBIC with reducing_gap=None is a properly antialiased (support-scaled) filter when
    shrinking, deterministic across platforms; upsampling uses the same filter.
    """
    square = center_crop_square(image)
    if square.shape[0] == size:
        return np.ascontiguousarray(square)
    resized = Image.fromarray(square).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """Encodes a uint8 [H, W] or [H, W, 1] image as grayscale PNG bytes (lossless)."""
    if image.ndim == 3:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
