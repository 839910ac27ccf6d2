"""NIH ChestX-ray14 (Wang et al. 2017): 112,120 frontal chest X-rays, 14 findings, from manual_dir.

Label: a 14-finding multi-hot vector in FINDINGS order ("No Finding" is all zeros). Extra
fields: patient_id, view_position (PA/AP), age (years; -1 when unparsable), sex (M/F) and
follow_up. The record `id` is the Image Index, e.g. `00000001_000.png`.

Splits: test = the official `test_list.txt`; the official `train_val_list.txt` is split by
patient: 10% of its patients (the first by sha256 of "nih:<patient id>") and all their images
form validation, the rest train. The official lists are patient-wise; validation never shares
a patient with train.

Before any image is encoded, Data_Entry_2017.csv, the two lists and the image files are checked
against each other and the first disagreement fails the build, named.
"""

from __future__ import annotations

import csv
import pathlib
import re

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from cxrjax.data import sources
from cxrjax.data.builders import common

FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = common.NO_FINDING
VAL_FRACTION = 0.1
RESOLUTIONS = (64, 128, 224, 256)
CSV_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
# The Data_Entry_2017.csv columns the builder reads (the file has a few more).
COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
)


class NihChestXray14(common.Builder):
    """NIH ChestX-ray14 PNGs + Data_Entry_2017.csv + official lists -> multi-label records."""

    name = "nih_chest_xray14"
    BUILDER_CONFIGS = [
        common.Config(name=f"r{size}", resolution=size, description=f"{size} px")
        for size in RESOLUTIONS
    ]
    DEFAULT_CONFIG_NAME = "r128"
    DEFAULT_RESOLUTION = 128
    LABEL_KIND = sources.MULTILABEL
    HOMEPAGE = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
    PUBLISHED = (
        "https://nihcc.app.box.com/v/ChestXray-NIHCC (NIH Clinical Center: images_001.tar.gz ... "
        "images_012.tar.gz, Data_Entry_2017.csv, train_val_list.txt, test_list.txt)",
    )
    LAYOUT = (
        "  <manual_dir>/Data_Entry_2017.csv    (or Data_Entry_2017_v2020.csv)\n"
        "  <manual_dir>/train_val_list.txt\n"
        "  <manual_dir>/test_list.txt\n"
        "  <manual_dir>/images/00000001_000.png ...       (all 12 archives extracted together)\n"
        "    or <manual_dir>/images_001/images/*.png ... images_012/images/*.png\n"
    )
    DESCRIPTION = __doc__
    CITATION = (
        "Xiaosong Wang et al. ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on "
        "Weakly-Supervised Classification and Localization of Common Thorax Diseases. CVPR 2017."
    )
    SPLIT_METHOD = (
        "test = official test_list.txt. validation = "
        f"{VAL_FRACTION:.0%} of the patients of train_val_list.txt, chosen as the first by "
        "sha256('nih:<patient id>'), with all their images. train = the rest of train_val_list.txt."
    )

    def class_names(self) -> tuple[str, ...]:
        return FINDINGS

    def _extra_features(self):
        return {
            "patient_id": tfds.features.Text(),
            "view_position": tfds.features.Text(),
            "age": tfds.features.Scalar(dtype=np.int32),
            "sex": tfds.features.Text(),
            "follow_up": tfds.features.Scalar(dtype=np.int32),
        }

    def _static_metadata(self):
        return {"val_fraction": VAL_FRACTION, "no_finding": NO_FINDING}

    def check_source(self) -> None:
        self._label_files()

    def _label_files(self) -> tuple[pathlib.Path, pathlib.Path]:
        """(manual_dir, csv path), or a layout error when a label file is missing."""
        root = self.manual_dir()
        csv_path = next((root / name for name in CSV_NAMES if (root / name).is_file()), None)
        if csv_path is None:
            raise self.layout_error(f"no {CSV_NAMES[0]} in {root}.")
        for list_name in ("train_val_list.txt", "test_list.txt"):
            if not (root / list_name).is_file():
                raise self.layout_error(f"no {list_name} in {root}.")
        return root, csv_path

    def _split_examples(self, dl_manager):
        root, csv_path = self._label_files()
        images = self._find_images(root)
        rows = self._read_csv(csv_path, images)
        split_of = self._read_lists(root, rows)

        train_val_patients = [
            rows[name]["patient_id"] for name, s in split_of.items() if s == "train"
        ]
        held_out = common.carve_groups(train_val_patients, VAL_FRACTION, salt="nih")
        test_patients = {rows[name]["patient_id"] for name, s in split_of.items() if s == "test"}
        overlap = test_patients & set(train_val_patients)
        if overlap:  # Not fatal: the official split is what it is; say so and record it.
            logging.warning("%s: %d patients are in both official lists", self.name, len(overlap))
        self.info.metadata["official_split_patient_overlap"] = len(overlap)

        names = {"train": [], "validation": [], "test": []}
        for name, row in rows.items():  # CSV order: by image index.
            split = split_of[name]
            if split == "train" and row["patient_id"] in held_out:
                split = "validation"
            names[split].append(name)
        return {
            split: self._examples(root, images, rows, split_names)
            for split, split_names in names.items()
            if split_names
        }

    def _find_images(self, root: pathlib.Path) -> dict[str, pathlib.Path]:
        """Image Index -> path, from images/ and images_*/images/ (names must be unique)."""
        folders = [root / "images"] if (root / "images").is_dir() else []
        folders += sorted(
            path / "images" for path in root.glob("images_*") if (path / "images").is_dir()
        )
        if not folders:
            raise self.layout_error(f"no images/ or images_001/images/ folder in {root}.")
        images: dict[str, pathlib.Path] = {}
        for folder in folders:
            for path in common.list_images(folder, root):
                if path.name in images:
                    raise common.DatasetError(
                        f"{self.name}: {path.name} is in both {images[path.name].parent} and "
                        f"{path.parent}"
                    )
                images[path.name] = path
        return images

    def _read_csv(self, csv_path: pathlib.Path, images: dict[str, pathlib.Path]) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        with csv_path.open(newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            missing = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
            if missing:
                raise common.DatasetError(f"{csv_path}: missing columns {missing}")
            for line, record in enumerate(reader, start=2):
                name = record["Image Index"].strip()
                where = f"{csv_path.name} line {line} ({name})"
                if name in rows:
                    raise common.DatasetError(f"{self.name}: {where}: duplicate Image Index")
                if name not in images:
                    raise common.DatasetError(
                        f"{self.name}: {where}: the image is missing from the image folders"
                    )
                rows[name] = {
                    "label": self._multi_hot(record["Finding Labels"], where),
                    "patient_id": record["Patient ID"].strip(),
                    "view_position": record["View Position"].strip(),
                    "age": _int_or(record["Patient Age"], -1),
                    "sex": record["Patient Gender"].strip(),
                    "follow_up": _int_or(record["Follow-up #"], -1),
                }
        extra = sorted(set(images) - set(rows))
        if extra:
            raise common.DatasetError(
                f"{self.name}: {images[extra[0]].relative_to(csv_path.parent)} has no row in "
                f"{csv_path.name} ({len(extra)} such images)"
            )
        return rows

    def _multi_hot(self, findings: str, where: str) -> np.ndarray:
        labels = [finding.strip() for finding in findings.split("|")]
        multi_hot = np.zeros(len(FINDINGS), np.int64)
        if labels == [NO_FINDING]:
            return multi_hot
        for finding in labels:
            if finding not in FINDINGS:
                raise common.DatasetError(
                    f"{self.name}: {where}: unknown finding {finding!r} in {findings!r}; expected "
                    f"{NO_FINDING!r} alone or '|'-separated names from {list(FINDINGS)}"
                )
            multi_hot[FINDINGS.index(finding)] = 1
        return multi_hot

    def _read_lists(self, root: pathlib.Path, rows: dict[str, dict]) -> dict[str, str]:
        """Image Index -> 'train' (train_val_list) or 'test', checked against the csv."""
        split_of: dict[str, str] = {}
        for list_name, split in (("train_val_list.txt", "train"), ("test_list.txt", "test")):
            lines = (root / list_name).read_text(encoding="utf-8").splitlines()
            for line, name in enumerate((entry.strip() for entry in lines), start=1):
                if not name:
                    continue
                where = f"{list_name} line {line} ({name})"
                if name not in rows:
                    raise common.DatasetError(f"{self.name}: {where}: not in the csv")
                if name in split_of:
                    raise common.DatasetError(f"{self.name}: {where}: already listed")
                split_of[name] = split
        unlisted = [name for name in rows if name not in split_of]
        if unlisted:
            raise common.DatasetError(
                f"{self.name}: {unlisted[0]} is in the csv but in neither train_val_list.txt nor "
                f"test_list.txt ({len(unlisted)} such images)"
            )
        return split_of

    def _examples(self, root, images, rows, names):
        for name in names:
            relative = images[name].relative_to(root).as_posix()
            yield common.Example(name, images[name], relative, rows[name])


def _int_or(text: str, default: int) -> int:
    """'58' -> 58, '058Y' (the 2017 v1 csv) -> 58, '' -> default."""
    match = re.search(r"\d+", text or "")
    return int(match.group()) if match else default
