"""Any folder of images: class folders, or a label CSV; a user's data, or synthetic images.

Layouts (class folder names become the class names, sorted, unless class_names is given):
  <folder>/<class>/*                    (images: .png .jpg .jpeg .tif .tiff .dcm .dicom, and
  <folder>/{train,val,test}/<class>/*    extension-less DICOM files; val/ may also be named
                                          validation/ or valid/, any case)
  <folder>/** + a label CSV             (`labels_csv`, default <folder>/labels.csv when present:
                                          path,label / path,<finding columns> / NIH's
                                          Data_Entry_2017.csv; see label_files.py), with optional
                                          patient_id and split columns; files may sit anywhere
                                          under the folder, and a top-level train/val/test
                                          folder gives a file's split when the CSV has none.

Top-level folders that hold folders but are not split names (e.g. training/, testing/), class
folders with no images, and folders with no images at all are errors that list what was found
and what is accepted.

Splits: given splits (folders or the CSV column) are kept (val -> validation); with train but
no validation, validation is carved from train; with none, train / validation / test are
carved 80% / 10% / 10%. Carving is by patient whenever patient ids are known (CSV column, or
`patient_pattern` on file names; NIH `<8-digit patient>_<3-digit>.png` names by default), else
by file (patients.py gives the rule). When given splits share patients, preparation warns with
the count and examples and records them in the metadata ("patient_overlap");
strict_patients=True makes it an error.

Each folder gets its own config, named `<folder_name>_r<resolution>`; without a folder_name the
name is `folder_<sha256(absolute path)[:10]>`, so different folders never share a directory. An
explicit folder_name that is already prepared from another folder is refused (pass another
name, or overwrite=True to replace it). A `provenance.json` (JSON object; synthetic data writes
generator, checkpoint step, seed) is stored in the dataset metadata under "provenance"; its
optional "class_names" list fixes the class order (e.g. ["normal", "pneumonia"] for a folder
holding only pneumonia/), so synthetic labels line up with the real dataset's. The build records
a fingerprint of the folder (file names, sizes, modification times) and of the label CSV and
options; preparing again after either changed fails unless overwrite=True.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
from collections.abc import Sequence

import tensorflow_datasets as tfds
from absl import logging

from cxrjax.data import sources
from cxrjax.data.builders import common, label_files, patients

PROVENANCE_FILE = "provenance.json"
DEFAULT_LABELS_CSV = "labels.csv"
DEFAULT_RESOLUTION = 64
TEST_FRACTION = 0.1
VAL_FRACTION = 0.1
# Split folder aliases -> split name; matched case-insensitively.
SPLIT_FOLDERS = {
    "train": "train",
    "val": "validation",
    "validation": "validation",
    "valid": "validation",
    "test": "test",
}
ACCEPTED = "train/, val/ (or validation/, valid/), test/"


class ImageFolderConfig(common.Config):
    """Config: the folder, its classes, the files of each split and a fingerprint."""

    def __init__(
        self,
        *,
        path: pathlib.Path,
        folder_name: str,
        class_names: tuple[str, ...],
        label_kind: str,
        splits: dict[str, list[patients.Item]],
        details: dict,
        provenance: dict | None,
        fingerprint: str,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.path = path
        self.folder_name = folder_name
        self.class_names = class_names
        self.label_kind = label_kind
        self.splits = splits  # split -> items (files with label and patient)
        self.details = details  # labels source, patient source, split method, overlap
        self.provenance = provenance
        self.fingerprint = fingerprint


class ImageFolder(common.Builder):
    """A folder of class folders (optionally under train/ val/ test/) or a label CSV -> records."""

    name = "image_folder"
    DEFAULT_RESOLUTION = DEFAULT_RESOLUTION
    NAME_OPTION = "folder_name"
    HOMEPAGE = ""
    PUBLISHED = ("(your own data: any folder in the layout above)",)
    LAYOUT = (
        "  <folder>/<class>/*.png|jpg|jpeg|tif|dcm          (splits carved 80/10/10)\n"
        "  or <folder>/{train,val,test}/<class>/*\n"
        "  or <folder>/** with a labels.csv (path,label | path,<findings...> [,patient_id]"
        "[,split])\n"
        "  optional <folder>/provenance.json                (stored in the dataset metadata)\n"
    )
    DESCRIPTION = __doc__

    def __init__(self, *, config: ImageFolderConfig, **kwargs):
        self.LABEL_KIND = config.label_kind  # Per folder: a CSV may hold multi-label data.
        super().__init__(config=config, **kwargs)

    @classmethod
    def make_config(
        cls,
        resolution: int | None = None,
        option: str | None = None,
        *,
        path: str | os.PathLike | None = None,
        class_names: Sequence[str] | None = None,
        labels_csv: str | os.PathLike | None = None,
        patient_pattern: str | None = None,
        strict_patients: bool = False,
    ) -> ImageFolderConfig:
        """Scans `path` (layout, labels, patients, splits) and names the config after it.

        Every layout, label and leakage check runs here, before anything is written.
        """
        if path is None:
            raise cls.layout_error("image_folder needs the folder: pass manual_dir (--manual_dir).")
        path = pathlib.Path(path).expanduser().resolve()
        if not path.is_dir():
            raise cls.layout_error(f"{path} is not a directory.")
        resolution = DEFAULT_RESOLUTION if resolution is None else int(resolution)
        if resolution < 1:
            raise common.DatasetError(f"{cls.name}: resolution must be positive, got {resolution}")
        folder_name = option or "folder_" + common.stable_hash(str(path))[:10]
        if not re.fullmatch(r"[A-Za-z0-9][\w\-.]*", folder_name):
            raise common.DatasetError(
                f"{cls.name}: folder_name {folder_name!r} must be letters, digits, '_', '-', '.'"
            )
        if patient_pattern:
            try:
                re.compile(patient_pattern)
            except re.error as error:
                raise common.DatasetError(
                    f"{cls.name}: patient_pattern {patient_pattern!r} is not a regex ({error})"
                ) from error
        provenance = _read_provenance(path)
        if class_names is None and provenance and provenance.get("class_names"):
            class_names = provenance["class_names"]
        names = tuple(str(name) for name in class_names) if class_names else None
        csv_path = _labels_csv(path, labels_csv)
        if csv_path is not None:
            items, names, multilabel, details = _scan_csv(path, csv_path, names)
        else:
            items, names, details = _scan_folders(path, names)
            multilabel = False
        if not multilabel and len(names) < 2:
            raise cls.layout_error(
                f"{path} has classes {list(names)}; a dataset needs at least two classes "
                "(pass class_names, or list them in provenance.json, when a folder holds only "
                "some)."
            )
        items, details["patient_ids"] = patients.assign_patients(items, patient_pattern)
        splits, details["split_method"] = _splits(items)
        found = patients.overlap(splits)
        if found:
            message = f"{cls.name}: {path}: {patients.overlap_message(found)}"
            if strict_patients:
                raise common.DatasetError(
                    message + " (strict_patients: fix the split or drop --strict_patients)"
                )
            logging.warning("%s", message)
        details["patient_overlap"] = found or {"count": 0}
        fingerprint = _fingerprint(path, names, csv_path, patient_pattern)
        return ImageFolderConfig(
            name=f"{folder_name}_r{resolution}",
            resolution=resolution,
            description=f"{path} at {resolution} px",
            path=path,
            folder_name=folder_name,
            class_names=names,
            label_kind=sources.MULTILABEL if multilabel else sources.MULTICLASS,
            splits=splits,
            details=details,
            provenance=provenance,
            fingerprint=fingerprint,
        )

    def class_names(self) -> tuple[str, ...]:
        return self.builder_config.class_names

    def _has_patients(self) -> bool:
        splits = self.builder_config.splits.values()
        return any(item.patient is not None for items in splits for item in items)

    def _extra_features(self):
        return {"patient_id": tfds.features.Text()} if self._has_patients() else {}

    def _static_metadata(self):
        config = self.builder_config
        metadata = {
            "source_dir": str(config.path),
            "fingerprint": config.fingerprint,
            **config.details,
        }
        if config.provenance is not None:
            metadata["provenance"] = config.provenance
        return metadata

    def check_reusable(self) -> None:
        config = self.builder_config
        stored_dir = self.info.metadata.get("source_dir")
        if stored_dir is not None and stored_dir != str(config.path):
            raise common.DatasetError(
                f"{self.name}/{config.name} in {self.data_dir_root} was prepared from "
                f"{stored_dir}, not {config.path}: pass another --name (folder_name), or none "
                "(the default name derives from the folder's path), or --overwrite to replace it"
            )
        stored = self.info.metadata.get("fingerprint")
        if stored is not None and stored != config.fingerprint:
            raise common.DatasetError(
                f"{self.name}: {config.path} changed since it was prepared into "
                f"{self.data_dir}. Pass overwrite=True (--overwrite) to rebuild it, or another "
                "folder_name (--name) to keep both."
            )

    def _split_examples(self, dl_manager):
        config = self.builder_config
        with_patient = self._has_patients()
        return {
            split: self._examples(config.splits[split], with_patient)
            for split in common.SPLITS
            if config.splits.get(split)
        }

    def _examples(self, items: list[patients.Item], with_patient: bool):
        for item in items:
            features = {"label": item.label}
            if with_patient:
                features["patient_id"] = item.patient or ""
            yield common.Example(item.key, item.path, item.key, features)


def path_name(path: str | os.PathLike) -> str:
    """A readable folder_name that is unique per folder: `<basename>-<sha256(abs path)[:8]>`.

    Two folders with the same base name (runA/syn, runB/syn) get different names.
    """
    path = pathlib.Path(path).expanduser().resolve()
    base = re.sub(r"[^\w\-.]", "_", path.name).lstrip("._-") or "folder"
    return f"{base}-{common.stable_hash(str(path))[:8]}"


def _labels_csv(path: pathlib.Path, labels_csv) -> pathlib.Path | None:
    if labels_csv:
        csv_path = pathlib.Path(labels_csv).expanduser()
        csv_path = (csv_path if csv_path.is_absolute() else path / csv_path).resolve()
        if not csv_path.is_file():
            raise common.DatasetError(f"image_folder: labels_csv {csv_path} does not exist")
        return csv_path
    default = path / DEFAULT_LABELS_CSV
    return default if default.is_file() else None


def _all_images(path: pathlib.Path) -> list[pathlib.Path]:
    """Every image file under `path` (hidden files and folders skipped), sorted."""
    images = []
    for directory, subdirs, names in os.walk(path):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(names):
            file = pathlib.Path(directory) / name
            if not name.startswith(".") and common.is_image_file(file):
                images.append(file)
    return images


def _scan_csv(path: pathlib.Path, csv_path: pathlib.Path, names):
    images = _all_images(path)
    if not images:
        raise _no_images(path)
    labels = label_files.read(csv_path, path, images, names)
    items = []
    for row in labels.rows:
        key = row.path.relative_to(path).as_posix()
        split = row.split
        if split is None and "/" in key:
            split = SPLIT_FOLDERS.get(key.split("/", 1)[0].lower())
        items.append(patients.Item(row.path, key, row.label, row.patient, split))
    unlabelled = len(images) - len(items)
    if unlabelled:
        logging.warning(
            "image_folder: %d images under %s have no row in %s; they are left out",
            unlabelled,
            path,
            csv_path.name,
        )
    details = {
        "labels": f"label file {csv_path}",
        "unlabelled_images": unlabelled,
        "ignored_columns": list(labels.ignored_columns),
    }
    return items, labels.class_names, labels.multilabel, details


def _scan_folders(path: pathlib.Path, names):
    split_dirs = _split_dirs(path)
    folders: dict[str, dict[str, pathlib.Path]] = {}  # split -> class -> folder
    for split, folder in (split_dirs or {None: path}).items():
        folders[split] = {}
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                folders[split][entry.name] = entry
            elif common.is_image_file(entry):
                raise common.DatasetError(
                    f"image_folder: {entry} is not inside a class folder (images go in "
                    f"<folder>/<class>/ or <folder>/<split>/<class>/; split folders: {ACCEPTED})"
                )
    found = sorted({name for per_class in folders.values() for name in per_class})
    if not found:
        raise _no_images(path)
    names = names or tuple(found)
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise common.DatasetError(
            f"image_folder: class folders {unknown} in {path} are not among class_names "
            f"{list(names)}"
        )
    items, counts = [], {}
    for split, per_class in folders.items():
        for name, folder in per_class.items():
            files = common.list_images(folder, path)
            counts[folder.relative_to(path).as_posix()] = len(files)
            label = names.index(name)
            for file in files:
                key = file.relative_to(path).as_posix()
                items.append(patients.Item(file, key, label, split=split))
    if not items:
        raise _no_images(path)
    empty = [folder for folder, count in counts.items() if count == 0]
    if empty:
        listing = ", ".join(f"{folder}/ {count}" for folder, count in counts.items())
        raise common.DatasetError(
            f"image_folder: {path}: class folders with no images: {empty} (images per folder: "
            f"{listing}; image files end in {', '.join(common.IMAGE_EXTENSIONS)} or are DICOM)"
        )
    return items, names, {"labels": "class folders"}


def _no_images(path: pathlib.Path) -> common.DatasetError:
    entries = sorted(e.name + ("/" if e.is_dir() else "") for e in path.iterdir())
    entries = [e for e in entries if not e.startswith(".")]
    return common.DatasetError(
        f"image_folder: no images in {path} (found {entries[:10] or 'nothing'}); accepted: "
        f"<folder>/<class>/<image>, split folders {ACCEPTED} holding class folders, or a "
        f"{DEFAULT_LABELS_CSV}; image files end in {', '.join(common.IMAGE_EXTENSIONS)} or are "
        "DICOM"
    )


def _split_dirs(path: pathlib.Path) -> dict[str, pathlib.Path]:
    """Split -> folder when `path` uses train/ val/ test/ folders, else {}.

    A top-level folder holding folders (rather than images) is a split folder; one whose name
    is not an accepted split name (e.g. training/) is an error, not a class.
    """
    splits: dict[str, pathlib.Path] = {}
    others = []
    for entry in sorted(path.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        split = SPLIT_FOLDERS.get(entry.name.lower())
        if split is None:
            others.append(entry)
        elif split in splits:
            raise common.DatasetError(f"{path}: both {splits[split].name}/ and {entry.name}/ exist")
        else:
            splits[split] = entry
    nested = [
        entry.name + "/"
        for entry in others
        if any(sub.is_dir() and not sub.name.startswith(".") for sub in entry.iterdir())
    ]
    if nested:
        raise common.DatasetError(
            f"image_folder: {path}: folders {nested} hold folders, so they look like split "
            f"folders, but split folders must be named {ACCEPTED} (any case), and class folders "
            f"must hold images directly; found top-level folders "
            f"{[e.name + '/' for e in [*splits.values(), *others]]}"
        )
    if splits and others:
        raise common.DatasetError(
            f"image_folder: {path} mixes split folders {sorted(p.name for p in splits.values())} "
            f"with other folders {[e.name for e in others]}; accepted split folders: {ACCEPTED}"
        )
    return splits


def _splits(items: list[patients.Item]) -> tuple[dict[str, list[patients.Item]], str]:
    """Given splits kept, missing ones carved (by patient when known): (splits, method)."""
    given = [item for item in items if item.split is not None]
    by = "patient" if any(item.patient is not None for item in items) else "file"
    if not given:
        splits = patients.carve(items, {"test": TEST_FRACTION, "validation": VAL_FRACTION})
        return splits, (
            f"train/validation/test carved {1 - VAL_FRACTION - TEST_FRACTION:.0%}/"
            f"{VAL_FRACTION:.0%}/{TEST_FRACTION:.0%} by {by}, per class, ordered by "
            "sha256('image_folder:<patient or path>')"
        )
    if len(given) != len(items):
        example = next(item.key for item in items if item.split is None)
        raise common.DatasetError(
            f"image_folder: {len(items) - len(given)} files have no split while others do "
            f"(e.g. {example}); give every file a split ({ACCEPTED} folders or the CSV column) "
            "or none"
        )
    splits: dict[str, list[patients.Item]] = {}
    for item in items:
        splits.setdefault(item.split, []).append(item)
    method = f"given splits {sorted(splits)} kept"
    if "train" in splits and "validation" not in splits:
        carved = patients.carve(splits.pop("train"), {"validation": VAL_FRACTION})
        splits.update(carved)
        method += f"; validation carved from train ({VAL_FRACTION:.0%} by {by})"
    return splits, method


def _read_provenance(path: pathlib.Path) -> dict | None:
    provenance_path = path / PROVENANCE_FILE
    if not provenance_path.is_file():
        return None
    try:
        provenance = json.loads(provenance_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise common.DatasetError(f"{provenance_path}: not readable JSON ({error})") from error
    if not isinstance(provenance, dict):
        raise common.DatasetError(f"{provenance_path}: must hold a JSON object")
    return provenance


def _fingerprint(
    path: pathlib.Path,
    class_names: tuple[str, ...],
    csv_path: pathlib.Path | None = None,
    pattern: str | None = None,
) -> str:
    """sha256 over every file's relative path, size and mtime, the class names, and (when
    used) the label CSV and patient pattern."""
    digest = hashlib.sha256(json.dumps(list(class_names)).encode())
    if csv_path is not None or pattern:
        digest.update(json.dumps({"csv": str(csv_path), "pattern": pattern}).encode())
        if csv_path is not None and not csv_path.is_relative_to(path):
            stat = csv_path.stat()
            digest.update(f"{csv_path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    for directory, subdirs, names in os.walk(path):
        subdirs.sort()
        for name in sorted(names):
            stat = os.stat(os.path.join(directory, name))
            relative = os.path.relpath(os.path.join(directory, name), path)
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
