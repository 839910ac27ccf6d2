"""Grain transforms: one record dict in, one record dict out.

A record follows the contract in `sources.py`. The pipeline applies, in order:
DecodeImage -> ResizeImage -> RandomAugment (training only) -> ToFloat -> CastLabel -> SelectFields.
Images stay uint8 [H, W] until ToFloat, so augmentation runs on small arrays with PIL and a
256-entry lookup table instead of float maths over every pixel.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
from PIL import Image

from cxrjax.data import imageio, sources


def as_plain_dict(config: Any) -> dict:
    """A dict from a dataclass, Mapping or ml_collections ConfigDict (which is no Mapping)."""
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"expected a dataclass, Mapping or ConfigDict, got {type(config).__name__}")


def _checked_fields(cls, values: dict) -> dict:
    """Rejects unknown keys so a misspelled config entry fails loudly instead of being ignored."""
    allowed = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    return values


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Strength of the per-example training augmentation (all ranges symmetric, uniform).

    Horizontal flip is off by default: it moves the heart to the wrong side, which a CXR
    classifier can exploit or be confused by.
    """

    enabled: bool = True
    rotation_deg: float = 5.0  # angle in [-r, r] degrees
    scale: float = 0.05  # zoom factor in [1 - s, 1 + s]
    translate: float = 0.05  # shift in [-t, t] of the image side, per axis
    brightness: float = 0.1  # additive shift in [-b, b] of the full range (255)
    contrast: float = 0.1  # factor in [1 - c, 1 + c] around the image mean
    hflip: bool = False
    fill: int = 0  # pixel value for areas moved in from outside the image

    def __post_init__(self):
        for name in ("rotation_deg", "scale", "translate", "brightness", "contrast"):
            if getattr(self, name) < 0:
                raise ValueError(f"AugmentConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.scale >= 1 or self.contrast >= 1:
            raise ValueError(
                "AugmentConfig.scale and .contrast must be < 1 (factors stay positive)"
            )
        if not 0 <= self.fill <= 255:
            raise ValueError(f"AugmentConfig.fill must be a uint8 value, got {self.fill}")

    @classmethod
    def from_config(cls, config: Any = None) -> AugmentConfig:
        """Builds from None (defaults), an AugmentConfig, a Mapping or a ConfigDict."""
        if isinstance(config, cls):
            return config
        return cls(**_checked_fields(cls, as_plain_dict(config)))


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Float image = (uint8 / 255 - mean) / std."""

    mean: float
    std: float

    def __post_init__(self):
        if self.std <= 0:
            raise ValueError(f"Normalization.std must be > 0, got {self.std}")

    @property
    def value_range(self) -> tuple[float, float]:
        return ((0.0 - self.mean) / self.std, (1.0 - self.mean) / self.std)

    @classmethod
    def from_config(cls, config: Any) -> Normalization:
        """Builds from a preset name, (mean, std), a Mapping/ConfigDict or a Normalization."""
        if isinstance(config, cls):
            return config
        if isinstance(config, str):
            if config not in NORMALIZATIONS:
                raise ValueError(
                    f"unknown normalization {config!r}; presets: {sorted(NORMALIZATIONS)}"
                )
            return NORMALIZATIONS[config]
        if isinstance(config, tuple | list):
            mean, std = config
            return cls(float(mean), float(std))
        return cls(**_checked_fields(cls, as_plain_dict(config)))


NORMALIZATIONS = {
    # Generators (PGGAN tanh output, DDPM) work in [-1, 1].
    "generator": Normalization(0.5, 0.5),
    "unit": Normalization(0.0, 1.0),
    # ImageNet statistics averaged over RGB, for grayscale input to ImageNet-style classifiers.
    "imagenet": Normalization(0.449, 0.226),
}


def record_name(record: Mapping) -> str:
    """Names a record in error messages by its id and, when known, its source and index."""
    name = f"record {record.get('id', '<no id>')!r}"
    if "index" in record:
        name += f" (source {record.get('source', '?')}, index {int(record['index'])})"
    return name


@dataclasses.dataclass(frozen=True)
class DecodeImage(grain.transforms.Map):
    """Decodes `image` (PNG/JPEG bytes or uint8 array) to uint8 [H, W]; errors name the record."""

    def map(self, record):
        record = dict(record)
        record["image"] = imageio.decode_gray(record["image"], name=record_name(record))
        return record


@dataclasses.dataclass(frozen=True)
class ResizeImage(grain.transforms.Map):
    """Center-crops and resizes `image` to [size, size] when its stored size differs.

    `content` > 0: the film is resized to `content` px and reflect-padded to `size` instead
    (`imageio.fit_square`), so a generator's canvas can hold it without resampling.
    """

    size: int
    content: int = 0

    def map(self, record):
        if record["image"].shape[:2] == (self.size, self.size) and not self.content:
            return record
        record = dict(record)
        record["image"] = imageio.fit_square(record["image"], self.size, self.content)
        return record


def affine_coefficients(
    height: int,
    width: int,
    *,
    angle_deg: float,
    scale: float,
    shift: tuple[float, float],
    flip: bool,
) -> tuple[float, ...]:
    """PIL AFFINE coefficients (output -> input): flip, rotate, scale about the center, shift."""
    theta = math.radians(angle_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    sign = -1.0 if flip else 1.0
    # Forward map: scale * R(theta) @ diag(sign, 1); its inverse is diag(sign, 1) @ R^T / scale
    # (written out: this runs once per training example).
    a, b = sign * cos / scale, sign * sin / scale
    d, e = -sin / scale, cos / scale
    # PIL samples at pixel centers (x + 0.5), so the geometric center is (W / 2, H / 2).
    cx, cy = width / 2.0, height / 2.0
    tx, ty = cx + shift[0], cy + shift[1]
    return (a, b, cx - (a * tx + b * ty), d, e, cy - (d * tx + e * ty))


def adjust_intensity(image: np.ndarray, *, brightness: float, contrast: float) -> np.ndarray:
    """Scales contrast about the image mean and adds brightness, via a uint8 lookup table."""
    mean = float(image.mean())
    levels = np.arange(256, dtype=np.float32)
    table = (levels - mean) * contrast + mean + 255.0 * brightness
    return np.clip(np.rint(table), 0, 255).astype(np.uint8)[image]


@dataclasses.dataclass(frozen=True)
class RandomAugment(grain.transforms.RandomMap):
    """Random affine (rotate/scale/shift/optional flip) and brightness/contrast on uint8 `image`."""

    config: AugmentConfig = AugmentConfig()

    def random_map(self, record, rng: np.random.Generator):
        config = self.config
        # Always draw the same numbers in the same order, so changing one strength (or turning
        # flip on) leaves the other parameters of each example unchanged.
        u = rng.uniform(-1.0, 1.0, size=7)
        if not config.enabled:
            return record
        image = record["image"]  # [H, W] uint8
        height, width = image.shape
        brightness, contrast = u[4] * config.brightness, 1.0 + u[5] * config.contrast
        if brightness != 0.0 or contrast != 1.0:
            image = adjust_intensity(image, brightness=brightness, contrast=contrast)
        angle, scale = u[0] * config.rotation_deg, 1.0 + u[1] * config.scale
        shift = (u[2] * config.translate * width, u[3] * config.translate * height)
        flip = config.hflip and u[6] > 0
        if angle != 0.0 or scale != 1.0 or shift != (0.0, 0.0) or flip:
            # Geometry after intensity, so the fill of moved-in areas stays exactly `fill`.
            coefficients = affine_coefficients(
                height, width, angle_deg=angle, scale=scale, shift=shift, flip=flip
            )
            warped = Image.fromarray(image).transform(
                (width, height),
                Image.Transform.AFFINE,
                coefficients,
                resample=Image.Resampling.BILINEAR,
                fillcolor=config.fill,
            )
            image = np.asarray(warped, dtype=np.uint8)
        record = dict(record)
        record["image"] = image
        return record


@dataclasses.dataclass(frozen=True)
class Chain(grain.transforms.Map):
    """Several Maps applied as one Grain stage: each stage costs per-element bookkeeping
    (statistics, byte counts) comparable to a small transform's own work."""

    maps: tuple[grain.transforms.Map, ...]

    def map(self, record):
        for transform in self.maps:
            record = transform.map(record)
        return record


@dataclasses.dataclass(frozen=True)
class ToFloat(grain.transforms.Map):
    """Converts uint8 `image` [H, W] to normalised float32 [H, W, 1]."""

    normalization: Normalization = NORMALIZATIONS["generator"]

    def map(self, record):
        record = dict(record)
        scale = np.float32(1.0 / (255.0 * self.normalization.std))
        offset = np.float32(self.normalization.mean / self.normalization.std)
        record["image"] = (record["image"].astype(np.float32) * scale - offset)[..., None]
        return record


@dataclasses.dataclass(frozen=True)
class CastLabel(grain.transforms.Map):
    """Casts `label` to int32 (multi-class) or a float32 multi-hot [num_classes] vector."""

    label_kind: str
    num_classes: int

    def map(self, record):
        label = np.asarray(record["label"])
        record = dict(record)
        if self.label_kind == sources.MULTICLASS:
            if label.ndim != 0 or not 0 <= int(label) < self.num_classes:
                raise ValueError(
                    f"{record_name(record)}: multi-class label must be an int in "
                    f"[0, {self.num_classes}), got {label!r}"
                )
            record["label"] = np.int32(label)
        else:
            if label.shape != (self.num_classes,):
                raise ValueError(
                    f"{record_name(record)}: multi-label label must have shape "
                    f"({self.num_classes},), got {label.shape}"
                )
            record["label"] = label.astype(np.float32)
        return record


@dataclasses.dataclass(frozen=True)
class SelectFields(grain.transforms.Map):
    """Keeps only `keys`, so extra source features (strings, metadata) never reach a batch."""

    keys: tuple[str, ...]

    def map(self, record):
        missing = [key for key in self.keys if key not in record]
        if missing:
            raise KeyError(f"{record_name(record)}: missing fields {missing}")
        return {key: record[key] for key in self.keys}
