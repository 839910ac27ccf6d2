"""Transforms: decode errors name the record, geometry conventions, value ranges, label casts."""

import ml_collections
import numpy as np
import pytest
from PIL import Image

from cxrjax.data import imageio, sources, transforms


def _image(size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def _warp(image, **kwargs):
    coefficients = transforms.affine_coefficients(*image.shape, **kwargs)
    warped = Image.fromarray(image).transform(
        image.shape[::-1], Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR
    )
    return np.asarray(warped)


def test_decode_png_round_trip_and_corrupt_record_is_named():
    image = _image()
    record = {"image": imageio.encode_png(image), "label": 0, "id": "a.png"}
    np.testing.assert_array_equal(transforms.DecodeImage().map(record)["image"], image)
    bad = {"image": imageio.encode_png(image)[:40], "label": 0, "id": "bad-007.png", "index": 7}
    with pytest.raises(imageio.CorruptImageError, match=r"bad-007\.png.*index 7"):
        transforms.DecodeImage().map(bad)


def test_resize_only_when_size_differs():
    record = {"image": _image(16)}
    assert transforms.ResizeImage(16).map(record) is record
    assert transforms.ResizeImage(8).map({"image": _image(20)})["image"].shape == (8, 8)


def test_padded_canvas_keeps_the_film_exact_and_crops_back():
    film = _image(28)
    canvas = transforms.ResizeImage(32, content=28).map({"image": film})["image"]
    assert canvas.shape == (32, 32)
    np.testing.assert_array_equal(imageio.crop_content(canvas, 28), film)  # no resampling
    # Reflection: the border mirrors the film's edge rows (numpy "reflect" excludes the edge).
    np.testing.assert_array_equal(canvas[0, 2:30], film[2])
    np.testing.assert_array_equal(canvas[31, 2:30], film[-3])
    # A stored size other than the film's is resized to the film first, then padded.
    other = transforms.ResizeImage(32, content=28).map({"image": _image(40)})["image"]
    np.testing.assert_array_equal(
        imageio.crop_content(other, 28), imageio.resize_square(_image(40), 28)
    )
    batch = np.stack([canvas, canvas])[..., None]  # NHWC
    assert imageio.crop_content(batch, 28, axes=(1, 2)).shape == (2, 28, 28, 1)
    with pytest.raises(ValueError, match="content 40 px"):
        imageio.fit_square(film, 32, 40)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(angle_deg=0.0, scale=1.0, shift=(0.0, 0.0), flip=False), lambda a: a),
        (dict(angle_deg=0.0, scale=1.0, shift=(0.0, 0.0), flip=True), lambda a: a[:, ::-1]),
        (dict(angle_deg=90.0, scale=1.0, shift=(0.0, 0.0), flip=False), lambda a: np.rot90(a, -1)),
    ],
)
def test_affine_is_about_the_pixel_grid_center(kwargs, expected):
    image = _image()
    # atol 1: cos(90 deg) is 6e-17, not 0, and PIL's fixed-point bilinear weights round.
    np.testing.assert_allclose(
        _warp(image, **kwargs).astype(int), expected(image).astype(int), rtol=0, atol=1
    )


def test_affine_shift_moves_content_and_fills_zero():
    image = _image() | 1  # No zero pixels, so the fill is recognisable.
    warped = _warp(image, angle_deg=0.0, scale=1.0, shift=(3.0, 0.0), flip=False)
    np.testing.assert_array_equal(warped[:, 3:], image[:, :-3])
    assert (warped[:, :3] == 0).all()


def test_augment_zero_strength_and_disabled_are_identity():
    record = {"image": _image()}
    zero = transforms.AugmentConfig(
        rotation_deg=0, scale=0, translate=0, brightness=0, contrast=0, hflip=False
    )
    off = transforms.AugmentConfig(enabled=False)
    for config in (zero, off):
        out = transforms.RandomAugment(config).random_map(record, np.random.default_rng(1))
        np.testing.assert_array_equal(out["image"], record["image"])


def test_augment_is_deterministic_in_the_rng_and_changes_pixels():
    record = {"image": _image(32)}
    augment = transforms.RandomAugment(transforms.AugmentConfig(rotation_deg=10))
    a = augment.random_map(record, np.random.default_rng(5))["image"]
    b = augment.random_map(record, np.random.default_rng(5))["image"]
    c = augment.random_map(record, np.random.default_rng(6))["image"]
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and a.shape == (32, 32)
    assert not np.array_equal(a, c) and not np.array_equal(a, record["image"])


def test_intensity_lookup_table():
    image = np.full((4, 4), 100, np.uint8)
    np.testing.assert_array_equal(
        transforms.adjust_intensity(image, brightness=0.1, contrast=1.0), np.full((4, 4), 126)
    )
    ramp = np.array([[0, 100], [200, 255]], np.uint8)  # mean 138.75
    out = transforms.adjust_intensity(ramp, brightness=0.0, contrast=0.5)
    np.testing.assert_array_equal(out, np.rint((ramp - 138.75) * 0.5 + 138.75).astype(np.uint8))


@pytest.mark.parametrize(
    ("normalization", "low", "high"),
    [("generator", -1.0, 1.0), ("unit", 0.0, 1.0), ((0.5, 0.25), -2.0, 2.0)],
)
def test_to_float_value_range(normalization, low, high):
    image = np.array([[0, 255]], np.uint8)
    norm = transforms.Normalization.from_config(normalization)
    out = transforms.ToFloat(norm).map({"image": image})["image"]
    assert out.dtype == np.float32 and out.shape == (1, 2, 1)
    np.testing.assert_allclose(out[..., 0], [[low, high]], atol=1e-6)
    assert norm.value_range == pytest.approx((low, high))


def test_cast_label_multiclass_and_multilabel():
    cast = transforms.CastLabel(sources.MULTICLASS, 3)
    out = cast.map({"label": np.int64(2), "id": "x"})["label"]
    assert out.dtype == np.int32 and out == 2
    with pytest.raises(ValueError, match="'x'"):
        cast.map({"label": 3, "id": "x"})
    multi = transforms.CastLabel(sources.MULTILABEL, 3)
    out = multi.map({"label": np.array([0, 1, 1], np.uint8), "id": "y"})["label"]
    assert out.dtype == np.float32 and out.tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="shape"):
        multi.map({"label": np.array([0, 1]), "id": "y"})


def test_select_fields_drops_extras_and_names_missing():
    select = transforms.SelectFields(("image", "label"))
    assert set(select.map({"image": 1, "label": 2, "view": "PA"})) == {"image", "label"}
    with pytest.raises(KeyError, match="label"):
        select.map({"image": 1, "id": "z"})


def test_configs_from_configdict_mapping_and_typos_fail():
    config = ml_collections.ConfigDict({"rotation_deg": 3.0, "hflip": True})
    assert transforms.AugmentConfig.from_config(config).rotation_deg == 3.0
    assert transforms.AugmentConfig.from_config({"enabled": False}).enabled is False
    assert transforms.AugmentConfig.from_config(None) == transforms.AugmentConfig()
    with pytest.raises(ValueError, match="rotaton"):
        transforms.AugmentConfig.from_config({"rotaton_deg": 3.0})
    assert transforms.Normalization.from_config({"mean": 0.4, "std": 0.2}).std == 0.2
    with pytest.raises(ValueError, match="presets"):
        transforms.Normalization.from_config("imagnet")
