"""Clinical inputs: DICOM / 16-bit decoding, label CSVs, patient-level splits and leakage checks."""

import logging
import random

import numpy as np
import pytest

from cxrjax.data import builders, imageio, sources
from cxrjax.data.builders import common, patients, testing


def ramp(height=16, width=20, peak=4095):
    return np.linspace(0, peak, height * width).reshape(height, width).astype(np.uint16)


def decode_file(path):
    return imageio.decode(path.read_bytes(), path.name)


# --- decoding -----------------------------------------------------------------------------------


def test_dicom_monochrome1_is_the_inverse_of_monochrome2(tmp_path):
    pixels = ramp()
    mono2, decision2 = decode_file(testing.write_dicom(tmp_path / "m2.dcm", pixels))
    mono1, decision1 = decode_file(
        testing.write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1")
    )
    # 12-bit declared range: the ramp spans the whole 8-bit range.
    assert mono2[0, 0] == 0 and mono2[-1, -1] == 255
    np.testing.assert_array_equal(mono1.astype(int), 255 - mono2.astype(int))
    assert "inverted" in decision1 and "inverted" not in decision2
    assert "BitsStored 12" in decision2


def test_dicom_window_rescale_and_voi_lut(tmp_path):
    pixels = ramp()
    windowed, decision = decode_file(
        testing.write_dicom(tmp_path / "w.dcm", pixels, window=(2048, 1024))
    )
    assert "window 2048/1024" in decision
    values = pixels.astype(np.float64)
    expected = imageio.to_uint8(np.clip((values - 2047.5) / 1023 + 0.5, 0, 1))
    np.testing.assert_array_equal(windowed, expected)
    assert (windowed[values < 1530] == 0).all() and (windowed[values > 2565] == 255).all()
    # Rescale: stored 0..4095 -> -1024..3071 (CT-like); the window is in rescaled units.
    rescaled, decision = decode_file(
        testing.write_dicom(tmp_path / "r.dcm", pixels, window=(1024, 1024), rescale=(1.0, -1024.0))
    )
    np.testing.assert_array_equal(rescaled, windowed)
    assert "rescale 1x-1024" in decision
    # A VOI LUT Sequence (here: the square of the input, 16-bit) wins over nothing else.
    lut = ((np.arange(4096) / 4095.0) ** 2 * 65535).astype(np.uint16)
    curved, decision = decode_file(testing.write_dicom(tmp_path / "l.dcm", pixels, voi_lut=lut))
    assert "VOI LUT (16-bit)" in decision
    np.testing.assert_allclose(curved, imageio.to_uint8((values / 4095.0) ** 2), atol=1)


def test_16bit_png_keeps_its_contrast(tmp_path):
    pixels = ramp(peak=4095)  # 12-bit data in a 16-bit PNG, as many exports write it.
    plain, decision = decode_file(testing.write_png16(tmp_path / "a.png", pixels))
    assert plain.max() == 255 and plain.min() == 0, decision  # Not near-black.
    assert "12-bit (no sBIT, max <= 4095)" in decision
    sbit, decision = decode_file(testing.write_png16(tmp_path / "b.png", pixels, sbit=12))
    np.testing.assert_array_equal(sbit, plain)
    assert "sBIT 12, values unshifted" in decision
    # Spec-conformant: 12-bit values shifted to 16 bits, sBIT 12 -> the same image.
    shifted, decision = decode_file(testing.write_png16(tmp_path / "c.png", pixels * 16, sbit=12))
    np.testing.assert_allclose(shifted, plain, atol=1)
    # A dark 12-bit film (max 1000 of 4095) stays dark rather than being stretched.
    dark, _ = decode_file(testing.write_png16(tmp_path / "d.png", ramp(peak=1000), sbit=12))
    assert dark.max() == round(1000 / 4095 * 255)


def test_rgba_uses_luma_and_ignores_alpha(tmp_path):
    path = testing.write_image(tmp_path / "x.png", 3, "RGBA")
    pixels, decision = decode_file(path)
    assert decision == "PNG RGBA: luma" and pixels.ndim == 2


def test_corrupt_dicom_is_named_or_skipped_and_listed(tmp_path):
    folder = tmp_path / "dicoms"
    for index in range(4):
        for name, photometric in (("normal", "MONOCHROME2"), ("effusion", "MONOCHROME1")):
            testing.write_dicom(folder / name / f"{index}.dcm", ramp(), photometric=photometric)
    # An extension-less DICOM counts as an image too (PACS exports).
    testing.write_dicom(folder / "normal" / "IM0001", ramp())
    broken = testing.write_dicom(folder / "normal" / "broken.dcm", ramp())
    broken.write_bytes(broken.read_bytes()[:-200])  # Pixel data cut short.
    options = dict(manual_dir=folder, data_dir=tmp_path / "out", resolution=8)
    with pytest.raises(builders.DatasetError, match=r"normal/broken\.dcm.*not a readable DICOM"):
        builders.prepare("image_folder", **options)
    builder = builders.prepare("image_folder", skip_corrupt=True, overwrite=True, **options)
    assert builder.info.metadata["skipped_corrupt"]["files"] == ["normal/broken.dcm"]
    total = sum(split.num_examples for split in builder.info.splits.values())
    assert total == 9  # 4 + 4 + the extension-less file
    counts = builder.info.metadata["decode"]["counts"]
    assert sum(counts.values()) == 9 and any("inverted" in key for key in counts)
    log = (tmp_path / "out").glob(f"image_folder/*/*/{common.DECODE_LOG}")
    lines = next(log).read_text().splitlines()
    assert len(lines) == 10 and any("normal/IM0001\tDICOM MONOCHROME2" in line for line in lines)


# --- label CSVs and patients --------------------------------------------------------------------

FINDINGS = testing.CSV_FINDINGS
write_csv_folder = testing.write_labelled_folder


def test_csv_multilabel_folder_is_multilabel_with_patient_splits(tmp_path):
    folder = write_csv_folder(tmp_path / "nihlike")
    builder = builders.prepare(
        "image_folder", manual_dir=folder, data_dir=tmp_path / "out", resolution=8
    )
    spec = builders.spec(builder)
    assert spec.label_kind == sources.MULTILABEL and spec.class_names == FINDINGS
    assert builder.info.metadata["ignored_columns"] == ["age"]
    assert builder.info.metadata["patient_ids"] == "label file column"
    seen = {}
    for split in builder.info.splits:
        for record in builder.as_data_source(split=split):
            assert record["label"].shape == (3,)
            seen.setdefault(record["patient_id"], set()).add(split)
    assert len(seen) == 12 and all(len(s) == 1 for s in seen.values())


def test_patient_carving_never_splits_a_patient():
    """Property test over random layouts: patients, films per patient, labels, fractions."""
    for seed in range(200):
        rnd = random.Random(seed)
        items = []
        for patient in range(rnd.randint(1, 40)):
            for film in range(rnd.randint(1, 6)):
                label = rnd.randrange(3) if seed % 2 else tuple(rnd.choices((0, 1), k=3))
                known = rnd.random() < 0.9  # Some files without a patient id.
                key = f"p{patient}/f{film}.png"
                items.append(
                    patients.Item(None, key, label, patient=f"{patient}" if known else None)
                )
        fractions = {"test": rnd.choice((0.1, 0.2, 0.5)), "validation": rnd.choice((0.1, 0.3))}
        carved = patients.carve(items, fractions)
        assert sorted(i.key for s in carved.values() for i in s) == sorted(i.key for i in items)
        assert patients.overlap(carved) == {}, seed
        assert carved["train"] or len(items) == 0


def test_user_splits_sharing_patients_warn_and_strict_fails(tmp_path, caplog):
    folder = testing.write_image_folder(tmp_path / "f", {})
    for split, patient_films in (("train", [(1, 0), (2, 0), (3, 0)]), ("test", [(1, 1), (4, 0)])):
        for cls in ("normal", "effusion"):
            for patient, film in patient_films:
                testing.write_image(folder / split / cls / f"{patient:08d}_{film:03d}.png", film)
    options = dict(manual_dir=folder, data_dir=tmp_path / "out", resolution=8)
    with caplog.at_level(logging.WARNING):
        builder = builders.prepare("image_folder", **options)
    overlap = builder.info.metadata["patient_overlap"]
    assert overlap["count"] == 1 and "patient 00000001" in overlap["examples"][0]
    assert "1 of 4 patients have images in more than one split" in caplog.text
    assert builder.info.metadata["patient_ids"] == "file names (NIH pattern)"
    with pytest.raises(builders.DatasetError, match="strict_patients"):
        builders.prepare("image_folder", strict_patients=True, overwrite=True, **options)
    # A user pattern decides patients instead (here: none shared).
    built = builders.prepare(
        "image_folder", patient_pattern=r"^(\d{8}_\d{3})", overwrite=True, **options
    )
    assert built.info.metadata["patient_overlap"] == {"count": 0}


def test_csv_split_column_is_checked_for_shared_patients(tmp_path):
    folder = write_csv_folder(tmp_path / "c", num_patients=6, split_column=True)
    options = dict(manual_dir=folder, data_dir=tmp_path / "out", resolution=8)
    with pytest.raises(builders.DatasetError, match=r"1 of 6 patients .*train/test: 1"):
        builders.prepare("image_folder", strict_patients=True, **options)


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"training": {"a": 2, "b": 2}, "testing": {"a": 1, "b": 1}}, "look like split folders"),
        ({"": {"a": 2, "b": 0}}, "class folders with no images"),
        ({}, "no images in"),
    ],
)
def test_bad_layouts_list_what_is_accepted(tmp_path, layout, message):
    folder = testing.write_image_folder(tmp_path / "f", layout)
    folder.mkdir(parents=True, exist_ok=True)
    if layout.get("", {}).get("b") == 0:
        (folder / "b").mkdir()
    with pytest.raises(builders.DatasetError, match=message) as error:
        builders.prepare("image_folder", manual_dir=folder, data_dir=tmp_path / "out")
    assert "train/, val/ (or validation/, valid/), test/" in str(error.value) or "end in" in str(
        error.value
    )
    assert "\n" not in str(error.value)


def test_nih_data_entry_csv_works_as_a_label_file(tmp_path):
    from cxrjax.data.builders import nih_chest_xray14

    root = testing.write_nih(tmp_path / "nih", nested=True)
    builder = builders.prepare(
        "image_folder",
        manual_dir=root,
        labels_csv="Data_Entry_2017.csv",
        class_names=nih_chest_xray14.FINDINGS,
        data_dir=tmp_path / "out",
        resolution=8,
    )
    assert builders.spec(builder).label_kind == sources.MULTILABEL
    assert builder.info.metadata["patient_ids"] == "label file column"
    assert "Patient Age" in builder.info.metadata["ignored_columns"]
    total = sum(split.num_examples for split in builder.info.splits.values())
    assert total == len(testing.NIH_ROWS)
    no_finding = sum(builders.class_counts(builder, s)["No Finding"] for s in builder.info.splits)
    assert no_finding == sum(row[1] == "No Finding" for row in testing.NIH_ROWS)
