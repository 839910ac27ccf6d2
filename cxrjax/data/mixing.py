"""Which records a run trains on: labels, scarcity, real/synthetic mixing, balanced epochs.

Everything here works on indices and labels, never on decoded images, and is deterministic
given its seed, so an experiment ("10 % of normal, plus synthetic normals") is reproducible and
can be checked by counting.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cxrjax import config as config_lib
from cxrjax.data import sources


def _rng(*words: int) -> np.random.Generator:
    """A generator keyed by a tuple of non-negative ints (seed, purpose, class, ...)."""
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


def round_half_up(value: float) -> int:
    """Rounds x.5 up (Python's round() would go to even), the documented count rule here."""
    return int(np.floor(value + 0.5))


def read_labels(source: Any, cache_path: str | os.PathLike | None = None, chunk_size: int = 1024):
    """Reads every record's label in chunks: int64 [N] (multi-class) or [N, C] (multi-label).

    Uses `source.__getitems__` when present (TFDS data sources read a chunk at once). With
    `cache_path`, loads a previously saved .npy when its length matches the source, and writes
    one otherwise (atomically, so concurrent processes never read a half-written file).
    """
    if cache_path is not None and os.path.exists(cache_path):
        labels = np.load(cache_path)
        if len(labels) != len(source):
            raise ValueError(
                f"label cache {cache_path} has {len(labels)} rows but the source has "
                f"{len(source)} records; delete the stale cache"
            )
        return labels
    getitems = getattr(source, "__getitems__", None)
    chunks = []
    for start in range(0, len(source), chunk_size):
        indices = list(range(start, min(start + chunk_size, len(source))))
        records = getitems(indices) if getitems else [source[i] for i in indices]
        chunks.append(np.stack([np.asarray(record["label"]) for record in records]))
    if not chunks:
        raise ValueError("cannot read labels of an empty source")
    labels = np.concatenate(chunks)
    labels = labels.astype(np.int64) if labels.ndim == 1 else labels.astype(np.float32)
    if cache_path is not None:
        from cxrjax import fileio

        with fileio.atomic_write(cache_path, "wb") as f:  # temp name unique per process/call
            np.save(f, labels)
    return labels


def _class_index(key: str | int, class_names: Sequence[str] | None) -> int:
    if isinstance(key, str):
        if class_names is None or key not in class_names:
            raise ValueError(f"unknown class {key!r}; class names: {class_names}")
        return list(class_names).index(key)
    return int(key)


def _members(labels: np.ndarray, class_index: int) -> np.ndarray:
    """Indices of class c: label == c (multi-class) or label[c] == 1 (multi-label)."""
    if labels.ndim == 1:
        return np.flatnonzero(labels == class_index)
    return np.flatnonzero(labels[:, class_index] > 0.5)


def class_indices(labels: np.ndarray, class_name: str, class_names: Sequence[str]) -> np.ndarray:
    """Sorted indices of the records of one class, e.g. the normals of an anomaly detector.

    Multi-class: label == index of `class_name`. Multi-label: records with that finding, or,
    for "No Finding" (not a label column, see builders.common.NO_FINDING), the all-zero rows.
    """
    labels = np.asarray(labels)
    if labels.ndim == 2 and class_name == "No Finding" and class_name not in class_names:
        return np.flatnonzero(labels.sum(axis=1) == 0)
    if class_name not in class_names:
        raise ValueError(f"unknown class {class_name!r}; class names: {list(class_names)}")
    return _members(labels, list(class_names).index(class_name))


def scarce_indices(
    labels: np.ndarray,
    keep: Mapping[str | int, float],
    *,
    seed: int,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Sorted indices keeping a random fraction of some classes and every record of the others.

    `keep` maps a class (name or index) to the fraction kept, e.g. {"normal": 0.1}. A class of
    n records keeps exactly round_half_up(fraction * n) of them, chosen without replacement by
    a generator keyed by (seed, class index), so other classes' choices do not shift it.
    Multi-label: a record belongs to class c when label[c] == 1; the listed classes must then be
    disjoint (e.g. "No Finding"), otherwise what to drop would be ambiguous and this raises.
    """
    labels = np.asarray(labels)
    dropped = np.zeros(len(labels), dtype=bool)
    claimed = np.zeros(len(labels), dtype=bool)
    for key, fraction in keep.items():
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"keep fraction for {key!r} must be in [0, 1], got {fraction}")
        class_index = _class_index(key, class_names)
        num_classes = labels.shape[1] if labels.ndim == 2 else None
        if class_index < 0 or (num_classes is not None and class_index >= num_classes):
            raise ValueError(f"class index {class_index} out of range")
        members = _members(labels, class_index)
        if claimed[members].any():
            raise ValueError(f"class {key!r} overlaps another class in `keep` (multi-label)")
        claimed[members] = True
        num_kept = round_half_up(fraction * len(members))
        kept = _rng(seed, 1, class_index).choice(members, size=num_kept, replace=False)
        dropped[members] = True
        dropped[kept] = False
    return np.flatnonzero(~dropped)


# Data-config fields that choose a subset of the training split (see `training_subset`).
# Drivers leave them out of their config hash and put the active ones into the run
# signature's dataset string, so runs from before these fields existed still resume.
SUBSET_FIELDS = ("data.only_class", "data.keep_class", "data.keep_fraction", "data.keep_seed")


def subset_options(data: Mapping[str, Any]) -> dict[str, Any]:
    """The subset fields of a data config (absent fields at their defaults)."""
    get = data.get
    return {
        "only_class": str(get("only_class", "") or ""),
        "keep_class": str(get("keep_class", "") or ""),
        "keep_fraction": float(get("keep_fraction", 1.0)),
        "keep_seed": int(get("keep_seed", 0)),
    }


def check_subset_options(data: Mapping[str, Any]) -> None:
    """ConfigError naming the field for a keep fraction outside (0, 1] or a negative seed."""
    options = subset_options(data)
    config_lib.check(
        0.0 < options["keep_fraction"] <= 1.0,
        "data.keep_fraction",
        f"must be in (0, 1], got {options['keep_fraction']}",
    )
    config_lib.check(options["keep_seed"] >= 0, "data.keep_seed", "must be >= 0")


def subset_signature(data: Mapping[str, Any]) -> str:
    """The run-signature suffix of the active subset options ("" when none is active)."""
    options = subset_options(data)
    suffix = f":only={options['only_class']}" if options["only_class"] else ""
    if options["keep_class"]:
        suffix += (
            f":keep={options['keep_class']}@{options['keep_fraction']:g}/seed{options['keep_seed']}"
        )
    return suffix


def training_subset(
    source: Any,
    spec: sources.DatasetSpec,
    data: Mapping[str, Any],
    labels: np.ndarray | None = None,
) -> Any:
    """The records of a training split that a run trains on, per the data config.

    One helper for every driver (classifier, PGGAN, DDPM):
      data.keep_class / keep_fraction / keep_seed  scarcity: keep `keep_fraction` of that
          class (exact count and choice of `scarce_indices`, keyed by `keep_seed`, so every
          run of an experiment sees the same scarce subset) and every record of the others;
      data.only_class  then keep only that class (e.g. a generator for anomaly detection).
    With none set, returns `source` itself; otherwise a `Part` over the kept indices.
    `labels` (aligned with `source`) saves reading them again.
    """
    options = subset_options(data)
    if not options["only_class"] and not options["keep_class"]:
        return source
    check_subset_options(data)
    for field in ("keep_class", "only_class"):
        name = options[field]
        known = name in spec.class_names or (
            field == "only_class" and spec.label_kind == sources.MULTILABEL and name == "No Finding"
        )
        config_lib.check(
            not name or known,
            f"data.{field}",
            f"{name!r} is not a class of {spec.name} {list(spec.class_names)}",
        )
    labels = read_labels(source) if labels is None else np.asarray(labels)
    indices = np.arange(len(source))
    names = []
    if options["keep_class"]:
        indices = scarce_indices(
            labels,
            {options["keep_class"]: options["keep_fraction"]},
            seed=options["keep_seed"],
            class_names=spec.class_names,
        )
        names.append(f"{options['keep_class']}@{options['keep_fraction']:g}")
    if options["only_class"]:
        members = class_indices(labels, options["only_class"], spec.class_names)
        indices = np.intersect1d(indices, members)
        names.append(f"only {options['only_class']}")
    if not len(indices):
        raise config_lib.ConfigError(
            f"config.data: the subset {', '.join(names)} of {spec.name} is empty"
        )
    return Part(source, name="real (" + ", ".join(names) + ")", indices=indices)


class Relabelled:
    """A source whose labels go through a lookup table: label -> table[label].

    For synthetic images whose folder classes are named differently from the real dataset's,
    or that all stand for one intended class (an unconditional generator's "synthetic"
    folder -> the scarce finding's multi-hot row). Everything else in the record is unchanged.
    """

    def __init__(self, source: Any, table: np.ndarray):
        self.source = source
        self.table = np.asarray(table)

    def __len__(self) -> int:
        return len(self.source)

    def _relabel(self, record: Mapping) -> dict:
        record = dict(record)
        record["label"] = self.table[int(np.asarray(record["label"]))]
        return record

    def __getitem__(self, index: int) -> dict:
        return self._relabel(self.source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        getitems = getattr(self.source, "__getitems__", None)
        records = getitems(list(indices)) if getitems else [self.source[i] for i in indices]
        return [self._relabel(record) for record in records]

    def __repr__(self) -> str:
        return f"Relabelled({self.source!r})"


def part_composition(
    mixed: MixedSource, labels: np.ndarray, class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """Per part of a mixed training source: name, synthetic flag, records, records per class.

    `labels` are the mixed source's labels (`MixedSource.select_labels`), in its order.
    """
    labels = np.asarray(labels)
    out, start = [], 0
    for part in mixed.parts:
        part_labels = labels[start : start + len(part)]
        start += len(part)
        per_class = {
            name: int(len(_members(part_labels, k))) if len(part_labels) else 0
            for k, name in enumerate(class_names)
        }
        out.append(
            {
                "name": part.name,
                "synthetic": bool(part.synthetic),
                "records": int(len(part)),
                "per_class": per_class,
            }
        )
    return out


@dataclasses.dataclass(frozen=True)
class Part:
    """A source taking part in training, with an optional index selection and its provenance."""

    source: Any
    name: str = "real"
    synthetic: bool = False
    indices: np.ndarray | None = None  # selected records of `source`; None = all

    def __len__(self) -> int:
        return len(self.source) if self.indices is None else len(self.indices)

    def source_index(self, position: int) -> int:
        return position if self.indices is None else int(self.indices[position])

    def selected(self) -> np.ndarray:
        return np.arange(len(self.source)) if self.indices is None else np.asarray(self.indices)


class MixedSource:
    """Random-access concatenation of Parts; records gain `index`, `source` and `is_synthetic`.

    `index` is the record's index in its own source, `source` the part number (names in
    `names`), and `id` is made a str, so every pipeline sees one record layout whatever the
    underlying sources are.
    """

    def __init__(self, parts: Sequence[Part]):
        if not parts:
            raise ValueError("MixedSource needs at least one part")
        self.parts = tuple(parts)
        self.names = tuple(part.name for part in self.parts)
        self._offsets = np.cumsum([0] + [len(part) for part in self.parts])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for MixedSource of length {len(self)}")
        part = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return part, self.parts[part].source_index(index - int(self._offsets[part]))

    def _tag(self, record: Mapping, part: int, source_index: int) -> dict:
        record = dict(record)
        record_id = record.get("id", str(source_index))
        record["id"] = record_id.decode() if isinstance(record_id, bytes) else str(record_id)
        record["index"] = np.int32(source_index)
        record["source"] = np.int32(part)
        record["is_synthetic"] = np.bool_(self.parts[part].synthetic)
        return record

    def __getitem__(self, index: int) -> dict:
        part, source_index = self._locate(int(index))
        return self._tag(self.parts[part].source[source_index], part, source_index)

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """Reads grouped by part, using each source's own batched read when it has one."""
        located = [self._locate(int(i)) for i in indices]
        records: list[dict | None] = [None] * len(located)
        for part_number, part in enumerate(self.parts):
            positions = [k for k, (p, _) in enumerate(located) if p == part_number]
            if not positions:
                continue
            wanted = [located[k][1] for k in positions]
            getitems = getattr(part.source, "__getitems__", None)
            fetched = getitems(wanted) if getitems else [part.source[i] for i in wanted]
            for k, record, source_index in zip(positions, fetched, wanted, strict=True):
                records[k] = self._tag(record, part_number, source_index)
        return records

    def select_labels(self, part_labels: Sequence[np.ndarray]) -> np.ndarray:
        """This source's labels from each part's full-source labels (e.g. cached read_labels)."""
        if len(part_labels) != len(self.parts):
            raise ValueError(f"got labels for {len(part_labels)} parts, have {len(self.parts)}")
        return np.concatenate(
            [
                np.asarray(labels)[part.selected()]
                for labels, part in zip(part_labels, self.parts, strict=True)
            ]
        )

    def __repr__(self) -> str:
        parts = ", ".join(f"{p.name}{'*' if p.synthetic else ''}={len(p)}" for p in self.parts)
        return f"MixedSource({parts})"


def as_mixed(source: Any) -> MixedSource:
    """Wraps a plain source, a Part or a sequence of Parts as a MixedSource."""
    if isinstance(source, MixedSource):
        return source
    if isinstance(source, Part):
        return MixedSource([source])
    if isinstance(source, Sequence) and source and all(isinstance(p, Part) for p in source):
        return MixedSource(source)
    return MixedSource([Part(source)])


def mix(
    real: Part | Sequence[Part],
    synthetic: Part | Sequence[Part],
    *,
    seed: int,
    fraction: float | None = None,
    count: int | None = None,
) -> MixedSource:
    """Real parts plus a seeded selection of synthetic records, as one MixedSource.

    Give exactly one of `fraction` (synthetic share of the mixed epoch: round_half_up(f * R /
    (1 - f)) synthetic records for R real ones) or `count` (exact number of synthetic
    records). Synthetic records are drawn without replacement from the pooled synthetic parts;
    asking for more than exist raises rather than silently repeating images. The share holds
    exactly per epoch; within a batch it varies around it because the epoch is shuffled.
    """
    real_parts = [real] if isinstance(real, Part) else list(real)
    synthetic_parts = [synthetic] if isinstance(synthetic, Part) else list(synthetic)
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of `fraction` or `count`")
    num_real = sum(len(part) for part in real_parts)
    if fraction is not None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"synthetic fraction must be in [0, 1), got {fraction}")
        count = round_half_up(fraction * num_real / (1.0 - fraction))
    available = sum(len(part) for part in synthetic_parts)
    if not 0 <= count <= available:
        raise ValueError(
            f"need {count} synthetic records but the synthetic parts hold {available}; "
            "generate more or lower the fraction/count"
        )
    # Pool (part, source index) pairs, then choose `count` of them.
    pool_part = np.concatenate([np.full(len(p), k) for k, p in enumerate(synthetic_parts)])
    pool_index = np.concatenate([p.selected() for p in synthetic_parts])
    chosen = np.sort(_rng(seed, 2).choice(len(pool_part), size=count, replace=False))
    chosen_parts = []
    for k, part in enumerate(synthetic_parts):
        indices = pool_index[chosen[pool_part[chosen] == k]]
        chosen_parts.append(dataclasses.replace(part, synthetic=True, indices=indices))
    return MixedSource(real_parts + chosen_parts)


def oversample(
    part: Part,
    labels: np.ndarray,
    class_name: str,
    class_names: Sequence[str],
    extra: int,
    *,
    seed: int,
) -> Part:
    """`extra` repeats of `part`'s records of `class_name`, as a Part of the same source.

    The control for synthetic augmentation at the same class prior: the scarce class grows to
    the synthetic arms' count with copies of its own real records instead of new images. Each
    record repeats as evenly as possible (walks of fresh seeded permutations). `labels` are
    aligned with `part.source`.
    """
    members = np.intersect1d(part.selected(), class_indices(labels, class_name, class_names))
    if extra < 0:
        raise ValueError(f"cannot oversample by {extra} records")
    if extra and not len(members):
        raise ValueError(f"no {class_name!r} records to oversample")
    cycles = -(-extra // max(len(members), 1))
    stream = np.concatenate(
        [members[_rng(seed, 5, cycle).permutation(len(members))] for cycle in range(cycles)]
        or [np.zeros(0, np.int64)]
    )
    factor = (len(members) + extra) / max(len(members), 1)
    name = f"real {class_name} repeats (oversampled x{factor:.2f})"
    return Part(part.source, name=name, indices=np.sort(stream[:extra]))


def oversample_config(part, labels, data, class_names, *, seed: int):
    """(repeats Part or None, description) for a data config's `oversample` block: the kept
    records of data.keep_class repeated until that class holds round(balance x its full
    count) records (balance > 0) or its kept count + count (count > 0)."""
    over = data.get("oversample")
    if over is None or not (over.balance > 0 or over.count > 0):
        return None, None
    name = data.keep_class
    config_lib.check(bool(name), "data.oversample", "needs data.keep_class (what to repeat)")
    members = class_indices(labels, name, class_names)
    kept = len(np.intersect1d(part.selected(), members))
    target = round_half_up(over.balance * len(members)) if over.balance > 0 else kept + over.count
    repeats = oversample(part, labels, name, class_names, target - kept, seed=seed)
    return repeats, {"class": name, "kept": kept, "target": target}


def balanced_epoch(
    labels: np.ndarray, num_classes: int, per_class: int, *, seed: int, epoch: int
) -> np.ndarray:
    """Positions into `labels` for one class-balanced epoch: `per_class` draws of every class.

    The epoch is laid out in rounds of one record per class (class order shuffled in each
    round), so any batch whose size is a multiple of the class count, aligned to the epoch
    start, holds exactly batch / K of every class. Each class is walked through an endless
    sequence of fresh permutations of its records: large classes are undersampled without
    repeats until exhausted, and small ones are repeated, each record as evenly as possible.
    Multi-class only.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(
            "class-balanced sampling needs multi-class labels [N]; for multi-label data "
            "(several findings per image) use a weighted loss instead"
        )
    columns = []
    for class_index in range(num_classes):
        members = np.flatnonzero(labels == class_index)
        if len(members) == 0:
            raise ValueError(f"class {class_index} has no records to balance with")
        start = epoch * per_class
        first_cycle, last_cycle = start // len(members), (start + per_class - 1) // len(members)
        stream = np.concatenate(
            [
                members[_rng(seed, 3, class_index, cycle).permutation(len(members))]
                for cycle in range(first_cycle, last_cycle + 1)
            ]
        )
        offset = start - first_cycle * len(members)
        columns.append(stream[offset : offset + per_class])
    rounds = np.stack(columns, axis=1)  # [per_class, K]
    return _rng(seed, 4, epoch).permuted(rounds, axis=1).reshape(-1)


def check_balanceable(labels: np.ndarray, spec: sources.DatasetSpec) -> None:
    """Raises unless `labels` are multi-class labels within the spec's classes."""
    if spec.label_kind != sources.MULTICLASS or np.asarray(labels).ndim != 1:
        raise ValueError(
            f"{spec.name}: class-balanced sampling is defined for multi-class labels only; "
            "for multi-label data use a weighted loss instead"
        )
    if len(labels) and int(np.max(labels)) >= spec.num_classes:
        raise ValueError(f"{spec.name}: label {int(np.max(labels))} >= {spec.num_classes} classes")
