"""Label spreadsheets for image_folder: which file has which label, patient and split.

A CSV with a header row. Columns (names matched case-insensitively, spaces = underscores):

  path          the image, relative to the image folder (a bare file name is also looked up
                anywhere under the folder, as NIH's `Image Index` is); aliases: image,
                image_index, file, filename
  label         multi-class: one class name per row                     } one of these
  finding_labels  NIH style: '|'-separated findings, "No Finding" = none } three label
  <findings>    multi-label: one 0/1 column per finding                 } forms
  patient_id    optional (aliases: patient, subject_id): patient-level splits and checks
  split         optional: train, val / validation / valid, test

With neither `label` nor `finding_labels`, every other column whose values are all 0, 1 or
blank is a finding (in column order); other columns are ignored and listed in the log. So
`path,label[,patient_id][,split]`, `path,Atelectasis,...,Hernia[,patient_id]` and NIH's own
Data_Entry_2017.csv (Image Index, Finding Labels, Patient ID, ...) all work as they are.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
import re

import numpy as np
from absl import logging

from cxrjax.data.builders import common

PATH_COLUMNS = ("path", "image", "image_index", "file", "filename", "file_name")
PATIENT_COLUMNS = ("patient_id", "patient", "subject_id")
SPLIT_COLUMNS = ("split",)
LABEL_COLUMN = "label"
FINDINGS_COLUMN = "finding_labels"
SPLIT_VALUES = {
    "train": "train",
    "val": "validation",
    "validation": "validation",
    "valid": "validation",
    "test": "test",
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One labelled image: the file, its label (index or multi-hot), patient and split."""

    path: pathlib.Path
    label: int | tuple[int, ...]
    patient: str | None
    split: str | None


@dataclasses.dataclass(frozen=True)
class LabelFile:
    """A parsed label CSV: rows, class names and whether labels are multi-label."""

    path: pathlib.Path
    rows: tuple[Row, ...]
    class_names: tuple[str, ...]
    multilabel: bool
    ignored_columns: tuple[str, ...]


def _norm(column: str) -> str:
    return re.sub(r"[\s#\-]+", "_", column.strip().lower()).strip("_")


def read(
    csv_path: pathlib.Path,
    folder: pathlib.Path,
    images: list[pathlib.Path],
    class_names: tuple[str, ...] | None = None,
) -> LabelFile:
    """Parses `csv_path`; resolves each row's image among `images` (the files under `folder`).

    Raises DatasetError naming the line for a missing image, an unknown class or split, a
    duplicate row, or a CSV without a path or label column.
    """
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            header = [name for name in (reader.fieldnames or []) if name]
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise common.DatasetError(f"{csv_path}: not a readable CSV ({error})") from error
    by_norm = {_norm(name): name for name in header}
    path_col = next((by_norm[c] for c in PATH_COLUMNS if c in by_norm), None)
    if path_col is None:
        raise common.DatasetError(
            f"{csv_path}: no image path column; found {header}, accepted {list(PATH_COLUMNS)}"
        )
    patient_col = next((by_norm[c] for c in PATIENT_COLUMNS if c in by_norm), None)
    split_col = next((by_norm[c] for c in SPLIT_COLUMNS if c in by_norm), None)
    used = {path_col, patient_col, split_col}
    label_col = by_norm.get(LABEL_COLUMN)
    findings_col = by_norm.get(FINDINGS_COLUMN)
    finding_cols: list[str] = []
    ignored: list[str] = []
    if label_col is None and findings_col is None:
        for name in header:
            if name in used:
                continue
            values = {(record.get(name) or "").strip() for record in records}
            (finding_cols if values <= {"0", "1", "", "0.0", "1.0"} else ignored).append(name)
        if not finding_cols:
            raise common.DatasetError(
                f"{csv_path}: no label column; found {header}, expected '{LABEL_COLUMN}', "
                "'Finding Labels' or 0/1 finding columns"
            )
    else:
        ignored = [n for n in header if n not in used and n not in (label_col, findings_col)]
    if ignored:
        logging.info("%s: ignoring columns %s", csv_path.name, ignored)

    by_relative = {p.relative_to(folder).as_posix(): p for p in images}
    by_name: dict[str, list[pathlib.Path]] = {}
    for p in images:
        by_name.setdefault(p.name, []).append(p)

    def resolve(text: str, where: str) -> pathlib.Path:
        text = text.strip().replace("\\", "/")
        if text in by_relative:
            return by_relative[text]
        candidates = by_name.get(pathlib.PurePosixPath(text).name, [])
        if len(candidates) == 1 and "/" not in text:
            return candidates[0]
        if len(candidates) > 1:
            raise common.DatasetError(f"{where}: {text!r} matches {len(candidates)} files")
        raise common.DatasetError(f"{where}: image {text!r} is not in {folder}")

    # Labels: raw per row first, class names after (sorted when not given).
    raw: list[tuple[pathlib.Path, object, str | None, str | None, str]] = []
    seen: dict[pathlib.Path, int] = {}
    for line, record in enumerate(records, start=2):
        where = f"{csv_path.name} line {line}"
        path = resolve(record.get(path_col) or "", where)
        if path in seen:
            raise common.DatasetError(f"{where}: {path.name} already on line {seen[path]}")
        seen[path] = line
        patient = (record.get(patient_col) or "").strip() or None if patient_col else None
        split = None
        if split_col:
            value = (record.get(split_col) or "").strip().lower()
            if value not in SPLIT_VALUES:
                raise common.DatasetError(
                    f"{where}: split {value!r} is not one of {sorted(SPLIT_VALUES)}"
                )
            split = SPLIT_VALUES[value]
        if label_col is not None:
            label = (record.get(label_col) or "").strip()
            if not label:
                raise common.DatasetError(f"{where}: empty label")
        elif findings_col is not None:
            text = (record.get(findings_col) or "").strip()
            parts = [p.strip() for p in text.split("|") if p.strip()]
            label = () if parts in ([], [common.NO_FINDING]) else tuple(parts)
        else:
            label = tuple(
                name for name in finding_cols if (record.get(name) or "").strip() in ("1", "1.0")
            )
        raw.append((path, label, patient, split, where))
    if not raw:
        raise common.DatasetError(f"{csv_path}: no rows")

    multilabel = label_col is None
    if class_names is None:
        if finding_cols:
            class_names = tuple(finding_cols)
        elif multilabel:
            class_names = tuple(sorted({f for _, label, *_ in raw for f in label}))
        else:
            class_names = tuple(sorted({label for _, label, *_ in raw}))
    rows = []
    for path, label, patient, split, where in raw:
        names = label if multilabel else (label,)
        unknown = [name for name in names if name not in class_names]
        if unknown:
            raise common.DatasetError(
                f"{where}: label {unknown[0]!r} is not among class_names {list(class_names)}"
            )
        if multilabel:
            hot = np.zeros(len(class_names), np.int64)
            hot[[class_names.index(name) for name in names]] = 1
            value = tuple(int(v) for v in hot)
        else:
            value = class_names.index(label)
        rows.append(Row(path, value, patient, split))
    return LabelFile(csv_path, tuple(rows), tuple(class_names), multilabel, tuple(ignored))
