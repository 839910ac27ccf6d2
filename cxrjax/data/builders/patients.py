"""Patient ids, patient-level carving of splits, and leakage checks across given splits.

Many films per patient are the rule in clinical data; a split that puts one patient's films on
both sides leaks. Patient ids come from a label file's column or from a file-name pattern
(NIH ChestX-ray14's `<8-digit patient>_<3-digit follow-up>.png` is recognised by default).

Carving (`carve`): items are grouped (by patient, else each file is its own group); groups are
stratified by label (a patient's most frequent label; one stratum for multi-label data) and,
per stratum, ordered by sha256("image_folder:<group>"); each carved split takes round(fraction
x groups) in turn (at least one once a stratum has 3 groups; train always keeps at least
one), train the rest. So a patient is
never in two carved splits, and without patient ids the result is the per-file carving of
earlier versions.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import re
from collections.abc import Sequence

from cxrjax.data.builders import common

# NIH ChestX-ray14 file names: 00000001_000.png = patient 00000001, follow-up 000.
NIH_PATTERN = r"^(?P<patient>\d{8})_\d{3}\.png$"
MAX_EXAMPLES = 5


@dataclasses.dataclass(frozen=True)
class Item:
    """One image: its file, key (path relative to the folder), label, patient, given split."""

    path: pathlib.Path
    key: str
    label: int | tuple[int, ...]
    patient: str | None = None
    split: str | None = None


def patient_from_name(pattern: re.Pattern, name: str) -> str | None:
    """The `patient` group (else group 1, else the whole match) of `pattern` in a file name."""
    match = pattern.search(name)
    if match is None:
        return None
    if "patient" in pattern.groupindex:
        return match.group("patient")
    return match.group(1) if pattern.groups else match.group(0)


def assign_patients(items: list[Item], pattern: str | None) -> tuple[list[Item], str]:
    """Fills missing patient ids from file names; returns (items, where ids came from).

    A user `pattern` must match every file without an id (else DatasetError naming one that
    does not); the default NIH pattern is used only when it matches every such file.
    """
    missing = [item for item in items if item.patient is None]
    if not missing:
        return items, "label file column" if items else "none"
    regex = re.compile(pattern or NIH_PATTERN)
    found = {item.key: patient_from_name(regex, item.path.name) for item in missing}
    unmatched = [key for key, patient in found.items() if patient is None]
    if unmatched:
        if pattern:
            raise common.DatasetError(
                f"image_folder: patient_pattern {pattern!r} does not match {len(unmatched)} file "
                f"names, e.g. {unmatched[:MAX_EXAMPLES]}"
            )
        return items, "label file column" if len(missing) < len(items) else "unknown"
    source = f"file names ({'patient_pattern ' + repr(pattern) if pattern else 'NIH pattern'})"
    items = [
        dataclasses.replace(item, patient=found[item.key]) if item.key in found else item
        for item in items
    ]
    return items, source


def _group(item: Item) -> str:
    return f"patient:{item.patient}" if item.patient is not None else item.key


def _stratum(labels: Sequence) -> object:
    if any(isinstance(label, tuple) for label in labels):
        return "all"  # Multi-label: one stratum.
    return collections.Counter(labels).most_common(1)[0][0]


def carve(items: Sequence[Item], fractions: dict[str, float]) -> dict[str, list[Item]]:
    """Splits items into `fractions` (in order) and train, by group; see the module docstring."""
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(_group(item), []).append(item)
    strata: dict[object, list[str]] = {}
    for group, members in groups.items():
        strata.setdefault(_stratum([m.label for m in members]), []).append(group)
    result: dict[str, list[Item]] = {split: [] for split in fractions}
    result["train"] = []
    for stratum in sorted(strata):  # Class indices, or the one multi-label stratum.
        ordered = sorted(strata[stratum], key=lambda g: common.stable_hash("image_folder:" + g))
        start = 0
        for split, fraction in fractions.items():
            count = round(fraction * len(ordered))
            if len(ordered) >= 3:
                count = max(count, 1)
            count = max(0, min(count, len(ordered) - start - 1))  # Train keeps one group.
            for group in ordered[start : start + count]:
                result[split] += groups[group]
            start += count
        for group in ordered[start:]:
            result["train"] += groups[group]
    return result


def overlap(splits: dict[str, Sequence[Item]]) -> dict:
    """Patients found in more than one split: count, pairs, examples (empty dict: none/unknown).

    Examples list each shared patient with one file per split it appears in.
    """
    where: dict[str, dict[str, str]] = {}
    for split, items in splits.items():
        for item in items:
            if item.patient is not None:
                where.setdefault(item.patient, {}).setdefault(split, item.key)
    shared = {patient: by_split for patient, by_split in where.items() if len(by_split) > 1}
    if not shared:
        return {}
    pairs = collections.Counter()
    for by_split in shared.values():
        names = sorted(by_split, key=lambda s: (common.SPLITS + (s,)).index(s))
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                pairs[f"{first}/{second}"] += 1
    examples = [
        f"patient {patient}: " + ", ".join(f"{split} {key}" for split, key in sorted(files.items()))
        for patient, files in sorted(shared.items())[:MAX_EXAMPLES]
    ]
    return {
        "count": len(shared),
        "patients": len(where),
        "pairs": dict(sorted(pairs.items())),
        "examples": examples,
    }


def overlap_message(found: dict) -> str:
    """One line: how many patients are in two splits, where, and examples."""
    pairs = ", ".join(f"{pair}: {count}" for pair, count in found["pairs"].items())
    return (
        f"{found['count']} of {found['patients']} patients have images in more than one split "
        f"({pairs}), e.g. {'; '.join(found['examples'][:3])}"
    )
