"""Kermany et al. 2018 pediatric chest X-rays (Guangzhou), normal vs pneumonia, from manual_dir.

Labels: `binary` (normal / pneumonia, from the folder) or `3class` (normal / bacteria / virus,
the pneumonia type parsed from file names like `person1_bacteria_1.jpeg`). The patient is parsed
from the file name too (`person1`, `IM-0115`, `NORMAL2-IM-0372`) and kept in `patient_id`; the
record `id` is the path under chest_xray/, e.g. `train/PNEUMONIA/person1_bacteria_1.jpeg`.

Splits: the official test/ is kept as test. The official val/ has only 16 images, so validation
is carved from train by patient: every patient of the official val/ folder plus 10% of the
patients of each train class folder (the first by sha256 of "kermany:<patient>"), with all
their images; train is the rest. A patient is never in both train and validation.
"""

from __future__ import annotations

import pathlib
import re

import tensorflow_datasets as tfds

from cxrjax.data.builders import common

BINARY = "binary"
THREE_CLASS = "3class"
VAL_FRACTION = 0.1
RESOLUTIONS = (64, 128, 224, 256)
CLASS_FOLDERS = ("NORMAL", "PNEUMONIA")
_NORMAL_NAME = re.compile(r"(?P<patient>(?:NORMAL\d*-)?IM-\d+)-\d+", re.IGNORECASE)
_PNEUMONIA_NAME = re.compile(r"(?P<patient>person\d+)_(?P<kind>bacteria|virus)_\d+", re.IGNORECASE)


class KermanyConfig(common.Config):
    """Config: resolution plus the label set (`binary` or `3class`)."""

    def __init__(self, *, labels: str, **kwargs):
        super().__init__(**kwargs)
        self.labels = labels


class KermanyPneumonia(common.Builder):
    """Kermany chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg -> records by patient."""

    name = "kermany_pneumonia"
    BUILDER_CONFIGS = [
        KermanyConfig(
            name=f"{labels}_r{size}",
            resolution=size,
            labels=labels,
            description=f"{labels}, {size} px",
        )
        for labels in (BINARY, THREE_CLASS)
        for size in RESOLUTIONS
    ]
    DEFAULT_CONFIG_NAME = "binary_r128"
    DEFAULT_RESOLUTION = 128
    NAME_OPTION = "labels"
    CHOICES = (BINARY, THREE_CLASS)
    CONFIG_CLASS = KermanyConfig
    HOMEPAGE = "https://data.mendeley.com/datasets/rscbjbr9sj/2"
    PUBLISHED = (
        "https://data.mendeley.com/datasets/rscbjbr9sj/2 (Mendeley Data, ChestXRay2017.zip)",
        "https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia (Kaggle)",
    )
    LAYOUT = (
        "  <manual_dir>/chest_xray/            (manual_dir may also be chest_xray/ itself)\n"
        "    train/NORMAL/IM-0115-0001.jpeg, NORMAL2-IM-0372-0001.jpeg, ...\n"
        "    train/PNEUMONIA/person1_bacteria_1.jpeg, person1_virus_6.jpeg, ...\n"
        "    val/NORMAL/..., val/PNEUMONIA/...   (optional: Kaggle's 16 images)\n"
        "    test/NORMAL/..., test/PNEUMONIA/...\n"
    )
    DESCRIPTION = __doc__
    CITATION = (
        "Daniel S. Kermany et al. Identifying Medical Diagnoses and Treatable Diseases by "
        "Image-Based Deep Learning. Cell 172(5), 2018."
    )
    SPLIT_METHOD = (
        f"test = official test/. validation = all patients of the official val/ folder plus "
        f"{VAL_FRACTION:.0%} of the patients of each train class folder, chosen as the first by "
        "sha256('kermany:<patient>'), with all their images. train = the remaining train/ images."
    )

    def class_names(self) -> tuple[str, ...]:
        if self.builder_config.labels == THREE_CLASS:
            return ("normal", "bacteria", "virus")
        return ("normal", "pneumonia")

    def _extra_features(self):
        return {"patient_id": tfds.features.Text()}

    def _static_metadata(self):
        return {"labels": self.builder_config.labels, "val_fraction": VAL_FRACTION}

    def _root(self) -> pathlib.Path:
        """Finds chest_xray/ under manual_dir (Kaggle's zip nests it twice)."""
        manual = self.manual_dir()
        for candidate in (manual, manual / "chest_xray", manual / "chest_xray" / "chest_xray"):
            if (candidate / "train").is_dir() and (candidate / "test").is_dir():
                return candidate
        raise self.layout_error(f"no chest_xray/train and chest_xray/test under {manual}.")

    def check_source(self) -> None:
        self._root()

    def _split_examples(self, dl_manager):
        root = self._root()
        files = {}  # split folder -> [(path, class folder, patient, label)]
        for split_dir in ("train", "val", "test"):
            if not (root / split_dir).is_dir():
                continue  # val/ is optional (Mendeley's release has none).
            files[split_dir] = []
            for folder in CLASS_FOLDERS:
                if not (root / split_dir / folder).is_dir():
                    raise self.layout_error(f"missing folder {root / split_dir / folder}.")
                for path in common.list_images(root / split_dir / folder, root):
                    patient, label = self._parse(path, folder, root)
                    files[split_dir].append((path, folder, patient, label))
            if not files[split_dir]:
                raise self.layout_error(f"no images in {root / split_dir}.")

        held_out = {patient for _, _, patient, _ in files.get("val", [])}
        for folder in CLASS_FOLDERS:
            patients = [patient for _, f, patient, _ in files["train"] if f == folder]
            held_out |= common.carve_groups(patients, VAL_FRACTION, salt="kermany")
        pooled = files["train"] + files.get("val", [])
        return {
            "train": self._examples(root, [f for f in pooled if f[2] not in held_out]),
            "validation": self._examples(root, [f for f in pooled if f[2] in held_out]),
            "test": self._examples(root, files["test"]),
        }

    def _parse(self, path: pathlib.Path, folder: str, root: pathlib.Path) -> tuple[str, int]:
        """(patient, label) from the file name; fails where the name contradicts the folder."""
        relative = path.relative_to(root).as_posix()
        normal = _NORMAL_NAME.fullmatch(path.stem)
        pneumonia = _PNEUMONIA_NAME.fullmatch(path.stem)
        if folder == "NORMAL" and pneumonia:
            raise common.DatasetError(
                f"{self.name}: {relative} is named as a {pneumonia['kind'].lower()} pneumonia "
                "image but sits in NORMAL/ (file name and folder disagree)"
            )
        if folder == "PNEUMONIA" and normal:
            raise common.DatasetError(
                f"{self.name}: {relative} is named as a normal image but sits in PNEUMONIA/ "
                "(file name and folder disagree)"
            )
        match = normal or pneumonia
        patient = match["patient"] if match else path.stem  # Unknown scheme: its own patient.
        if folder == "NORMAL":
            return patient, 0
        if self.builder_config.labels == BINARY:
            return patient, 1
        if not pneumonia:
            raise common.DatasetError(
                f"{self.name}: cannot tell bacteria from virus for {relative}: 3class labels need "
                "names like person<N>_bacteria_<M>.jpeg or person<N>_virus_<M>.jpeg"
            )
        return patient, 1 if pneumonia["kind"].lower() == "bacteria" else 2

    def _examples(self, root: pathlib.Path, files):
        for path, _, patient, label in files:
            key = path.relative_to(root).as_posix()
            yield common.Example(key, path, key, {"label": label, "patient_id": patient})
