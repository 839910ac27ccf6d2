"""Tiny fake datasets in the published layouts, for tests and smoke runs of the builders.

Each writer puts real PNG/JPEG files (40x30 by default: non-square, so cropping is exercised)
in the layout the publisher ships, and returns what a correct build must produce, so tests
compare against an independent statement of the truth rather than the builder's own output.
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
import struct
import zlib

import numpy as np
from PIL import Image

from cxrjax.data.builders import nih_chest_xray14

SIZE = (40, 30)  # (width, height), as PIL takes it.


def write_image(path: pathlib.Path, seed: int, mode: str = "L", size=SIZE) -> pathlib.Path:
    """Writes a smooth-plus-noise image; mode L (gray), RGB, RGBA or I;16 (16-bit PNG)."""
    width, height = size
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, width)[None, :] * np.linspace(0.5, 1, height)[:, None]
    pixels = np.clip(ramp * 200 + rng.normal(0, 20, (height, width)), 0, 255)
    if mode == "I;16":
        image = Image.fromarray((pixels * 257).astype(np.uint16))
    else:
        image = Image.fromarray(pixels.astype(np.uint8)).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_corrupt(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Writes the first half of a real image: right name and header, truncated data."""
    write_image(path, seed, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# --- kermany_pneumonia -----------------------------------------------------------------------

# (split folder, class folder, file name); 3class label and patient follow from the name.
KERMANY_FILES = (
    ("train", "NORMAL", "IM-0001-0001.jpeg"),
    ("train", "NORMAL", "IM-0001-0002.jpeg"),
    ("train", "NORMAL", "IM-0002-0001.jpeg"),
    ("train", "NORMAL", "NORMAL2-IM-0003-0001.jpeg"),
    ("train", "NORMAL", "NORMAL2-IM-0003-0002.jpeg"),
    ("train", "NORMAL", "IM-0004-0001.jpeg"),
    ("train", "NORMAL", "IM-0005-0001.jpeg"),
    ("train", "NORMAL", "IM-0006-0001.jpeg"),
    ("train", "PNEUMONIA", "person1_bacteria_1.jpeg"),
    ("train", "PNEUMONIA", "person1_virus_2.jpeg"),
    ("train", "PNEUMONIA", "person2_bacteria_3.jpeg"),
    ("train", "PNEUMONIA", "person3_virus_4.jpeg"),
    ("train", "PNEUMONIA", "person4_bacteria_5.jpeg"),
    ("train", "PNEUMONIA", "person5_bacteria_6.jpeg"),
    ("train", "PNEUMONIA", "person6_virus_7.jpeg"),
    ("val", "NORMAL", "IM-0007-0001.jpeg"),
    ("val", "PNEUMONIA", "person7_bacteria_8.jpeg"),
    ("val", "PNEUMONIA", "person1_bacteria_9.jpeg"),  # person1 also has train images.
    ("test", "NORMAL", "IM-0101-0001.jpeg"),
    ("test", "NORMAL", "NORMAL2-IM-0102-0001.jpeg"),
    ("test", "PNEUMONIA", "person101_bacteria_1.jpeg"),
    ("test", "PNEUMONIA", "person102_virus_2.jpeg"),
)
KERMANY_CORRUPT = ("train", "NORMAL", "IM-0008-0001.jpeg")
KERMANY_MISLABELLED = ("train", "NORMAL", "person9_bacteria_10.jpeg")


def kermany_patient(file_name: str) -> str:
    stem = file_name.rsplit(".", 1)[0]
    return stem.split("_")[0] if stem.startswith("person") else stem.rsplit("-", 1)[0]


def kermany_label3(folder: str, file_name: str) -> int:
    if folder == "NORMAL":
        return 0
    return 1 if "bacteria" in file_name else 2


def write_kermany(
    manual_dir: pathlib.Path,
    *,
    corrupt: bool = False,
    mislabelled: bool = False,
    nested: bool = False,
) -> pathlib.Path:
    """Writes <manual_dir>/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg (returned).

    Pneumonia images are RGB JPEGs (as some Kermany files are), normal ones grayscale.
    nested=True mimics Kaggle's zip (chest_xray/chest_xray/...).
    """
    root = manual_dir / "chest_xray" / "chest_xray" if nested else manual_dir / "chest_xray"
    for seed, (split, folder, name) in enumerate(KERMANY_FILES):
        write_image(root / split / folder / name, seed, "RGB" if folder == "PNEUMONIA" else "L")
    if corrupt:
        write_corrupt(root.joinpath(*KERMANY_CORRUPT))
    if mislabelled:
        write_image(root.joinpath(*KERMANY_MISLABELLED), 99)
    (root / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\0")  # Ignored, as on a Mac.
    return root


# --- nih_chest_xray14 ------------------------------------------------------------------------

# (Image Index, Finding Labels, Patient ID, age, sex, view, official list, PNG mode)
NIH_ROWS = (
    ("00000001_000.png", "Cardiomegaly", 1, 58, "M", "PA", "train_val", "L"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1, 58, "M", "PA", "train_val", "I;16"),
    ("00000002_000.png", "No Finding", 2, 81, "M", "PA", "train_val", "L"),
    ("00000003_000.png", "Hernia", 3, 74, "F", "PA", "train_val", "RGBA"),
    ("00000003_001.png", "Hernia|Infiltration", 3, 75, "F", "AP", "train_val", "L"),
    ("00000004_000.png", "Mass|Nodule", 4, 82, "M", "AP", "train_val", "L"),
    ("00000005_000.png", "No Finding", 5, 69, "F", "PA", "train_val", "L"),
    ("00000006_000.png", "Effusion|Pleural_Thickening", 6, 22, "M", "PA", "train_val", "L"),
    ("00000006_001.png", "Atelectasis|Pneumothorax", 6, 22, "M", "PA", "train_val", "I;16"),
    ("00000007_000.png", "Consolidation|Edema|Fibrosis|Pneumonia", 7, 40, "F", "AP", "test", "L"),
    ("00000008_000.png", "No Finding", 8, 33, "F", "PA", "test", "L"),
    ("00000008_001.png", "Effusion", 8, 33, "F", "PA", "test", "L"),
)
NIH_CORRUPT = "00000009_000.png"  # A train_val row whose file is truncated.
NIH_HEADER = (
    *nih_chest_xray14.COLUMNS,
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
    "",
)


def write_nih(
    manual_dir: pathlib.Path,
    *,
    nested: bool = False,
    corrupt: bool = False,
    drop_image: str | None = None,
    extra_listed: str | None = None,
) -> pathlib.Path:
    """Writes NIH's release layout (images/ flat, or images_00N/images/ when nested).

    Images are 8-bit gray, 16-bit gray and RGBA PNGs. drop_image deletes one image its csv row
    still names; extra_listed adds an entry to train_val_list.txt that the csv lacks.
    """
    rows = list(NIH_ROWS)
    if corrupt:
        rows.append((NIH_CORRUPT, "No Finding", 9, 50, "M", "PA", "train_val", "L"))
    for seed, (name, *_, mode) in enumerate(rows):
        folder = manual_dir / (f"images_{1 + seed % 2:03d}/images" if nested else "images")
        if name == NIH_CORRUPT:
            write_corrupt(folder / name)
        elif name != drop_image:
            write_image(folder / name, seed, mode)
    with (manual_dir / "Data_Entry_2017.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(NIH_HEADER)
        for name, findings, patient, age, sex, view, _, _ in rows:
            follow_up = int(name[9:12])
            writer.writerow(
                [name, findings, follow_up, patient, age, sex, view, 40, 30, 0.143, 0.143, ""]
            )
    lists = {"train_val": [], "test": []}
    for name, *_, official, _ in rows:
        lists[official].append(name)
    if extra_listed:
        lists["train_val"].append(extra_listed)
    for official, names in lists.items():
        (manual_dir / f"{official}_list.txt").write_text("\n".join(names) + "\n")
    return manual_dir


# --- image_folder and pneumonia_mnist --------------------------------------------------------


def write_image_folder(
    root: pathlib.Path,
    counts: dict[str, dict[str, int]],
    *,
    provenance: dict | None = None,
    suffix: str = ".png",
) -> pathlib.Path:
    """Writes root/<split>/<class>/NNN<suffix> for counts {split: {class: n}}; split '' = none."""
    seed = 0
    for split, per_class in counts.items():
        for name, count in per_class.items():
            for index in range(count):
                seed += 1
                write_image(
                    root / split / name / f"{index:03d}{suffix}", seed, "RGB" if seed % 2 else "L"
                )
    if provenance is not None:
        (root / "provenance.json").write_text(json.dumps(provenance))
    return root


def write_medmnist(
    manual_dir: pathlib.Path, size: int, counts=(6, 2, 4), *, drop_label: bool = False
) -> pathlib.Path:
    """Writes a MedMNIST-style pneumoniamnist[_size].npz (labels alternate 0, 1)."""
    rng = np.random.default_rng(size)
    arrays = {}
    for prefix, count in zip(("train", "val", "test"), counts, strict=True):
        arrays[f"{prefix}_images"] = rng.integers(0, 256, (count, size, size), dtype=np.uint8)
        arrays[f"{prefix}_labels"] = (np.arange(count) % 2).astype(np.uint8)[:, None]
    if drop_label:
        arrays["val_labels"] = arrays["val_labels"][:-1]
    name = "pneumoniamnist.npz" if size == 28 else f"pneumoniamnist_{size}.npz"
    manual_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    (manual_dir / name).write_bytes(buffer.getvalue())
    return manual_dir / name


# --- clinical formats: DICOM and 16-bit PNG ---------------------------------------------------


def write_dicom(
    path: pathlib.Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    voi_lut: np.ndarray | None = None,
) -> pathlib.Path:
    """Writes an uncompressed DICOM file (pydicom) of uint16 `pixels` [H, W] with the given
    photometric interpretation, BitsStored, optional window (center, width), rescale (slope,
    intercept) and VOI LUT Sequence (uint16 LUT over the stored values)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.set_pixel_data(
        np.asarray(pixels, np.uint16),
        photometric_interpretation=photometric,
        bits_stored=bits_stored,
    )
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 16]
        item.add_new((0x0028, 0x3006), "US", [int(v) for v in voi_lut])  # LUT Data
        ds.VOILUTSequence = [item]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_png16(path: pathlib.Path, pixels: np.ndarray, sbit: int | None = None) -> pathlib.Path:
    """Writes a 16-bit grayscale PNG; `sbit` adds an sBIT chunk (significant bits)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint16)).save(buffer, format="PNG")
    data = buffer.getvalue()
    if sbit is not None:
        body = b"sBIT" + bytes([sbit])
        chunk = struct.pack(">I", 1) + body + struct.pack(">I", zlib.crc32(body))
        ihdr_end = 8 + 8 + 13 + 4  # signature, IHDR header, IHDR data, CRC
        data = data[:ihdr_end] + chunk + data[ihdr_end:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


CSV_FINDINGS = ("Effusion", "Nodule", "Mass")


def write_labelled_folder(
    root: pathlib.Path, num_patients: int = 12, films: int = 2, split_column: bool = False
) -> pathlib.Path:
    """NIH-named PNGs in two nested folders + labels.csv with finding columns, patient_id, an
    ignored age column and (split_column) a split column where patient 1 is in train and test."""
    rng = np.random.default_rng(0)
    header = (
        "path," + ",".join(CSV_FINDINGS) + ",patient_id,age" + (",split" if split_column else "")
    )
    lines = [header]
    for patient in range(num_patients):
        for film in range(films):
            name = f"{patient + 1:08d}_{film:03d}.png"
            write_image(root / f"images_{patient % 2}" / name, patient * 10 + film)
            hot = rng.integers(0, 2, len(CSV_FINDINGS))
            row = f"{name},{','.join(map(str, hot))},P{patient},{40 + patient}"
            if split_column:
                row += ",test" if patient == 0 or (patient == 1 and film == 0) else ",train"
            lines.append(row)
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root
