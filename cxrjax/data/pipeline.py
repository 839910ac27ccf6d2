"""Grain input pipelines: training batches (sharded, shuffled, augmented) and padded eval batches.

Training order: source -> (scarcity/mixing selection, done by `mixing` before the call) ->
shuffle(seed), re-shuffled every epoch (or class-balanced epochs) -> decode -> resize -> augment
-> float -> labels -> this process's rows of each global batch -> batch -> to_iter_dataset ->
optional worker processes. All maps are lazy, so a process decodes only its own rows, and the
global stream (order and augmentation) is the same whatever the process count.

Everything before `to_iter_dataset` is a random-access `MapDataset`, so an iterator's whole state
is the index of the next batch: `get_state()` is a tiny JSON dict, restoring it resumes on
exactly the next batch, and the batches do not depend on the number of threads or workers.
Batches are the process-local slice of the global batch, ready for
`jax.make_array_from_process_local_data`; drop the string `id` field (HOST_ONLY_KEYS) first.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
from absl import flags, logging

from cxrjax.data import imageio, mixing, sources, transforms

TRAIN_KEYS = ("image", "label", "index", "source", "is_synthetic")
EVAL_KEYS = (*TRAIN_KEYS, "mask", "id")
HOST_ONLY_KEYS = ("id",)  # str arrays: keep on the host to match predictions to records.

# What a training pipeline does with a record whose image cannot be decoded (a truncated PNG):
# "error" stops with CorruptImageError naming the record; "mask" logs it, puts the next readable
# record of the stream in its place with `mask` False (a masked loss ignores it, a step that
# ignores the mask sees a real image) and lets the loop count it (see loop.run's
# max_bad_fraction). Batches carry `mask` only under "mask".
BAD_RECORD_POLICIES = ("error", "mask")
# Config fields (data.*) of the policy; a run may change them on resume (not in its hash).
POLICY_FIELDS = ("data.bad_records", "data.max_bad_fraction")


def check_bad_records(config) -> None:
    """Validates data.bad_records / data.max_bad_fraction (absent = "error", 0.01)."""
    from cxrjax import config as config_lib

    data = config.data
    if "bad_records" in data:
        config_lib.check_choice(config, "data.bad_records", BAD_RECORD_POLICIES)
    fraction = data.get("max_bad_fraction", 0.01)
    config_lib.check(
        isinstance(fraction, (int, float)) and 0.0 <= fraction < 1.0,
        "data.max_bad_fraction",
        f"must be in [0, 1), got {fraction!r}",
    )


def bad_record_options(data) -> dict[str, Any]:
    """`make_train_iterator` keywords from a data config (default: stop on the first)."""
    return {"bad_records": data.get("bad_records", "error")}


def max_bad_fraction(data) -> float:
    """`loop.run`'s max_bad_fraction from a data config."""
    return float(data.get("max_bad_fraction", 0.01))


# A "mask" pipeline looks this far ahead in the stream for a readable substitute.
_MAX_SUBSTITUTE_DISTANCE = 64


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where this process sits: its index among processes, and the global device count."""

    process_index: int
    process_count: int
    device_count: int


def resolve_topology(
    process_index: int | None = None,
    process_count: int | None = None,
    device_count: int | None = None,
) -> Topology:
    """Fills unset fields from jax (imported here only, so worker processes never load it)."""
    if process_index is None or process_count is None or device_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        device_count = jax.device_count() if device_count is None else device_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return Topology(int(process_index), int(process_count), int(device_count))


def local_batch_size(global_batch_size: int, topology: Topology) -> int:
    """This process's share of the global batch, after checking it divides evenly."""
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if global_batch_size % topology.process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by process_count "
            f"{topology.process_count}: every process must load the same number of examples"
        )
    if global_batch_size % topology.device_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by device_count "
            f"{topology.device_count}: the batch is split evenly over the 'data' mesh axis"
        )
    return global_batch_size // topology.process_count


def derive_seed(seed: int, *words: int) -> int:
    """A 32-bit seed (what Grain accepts) for one purpose, from the run seed and context words."""
    return int(np.random.SeedSequence([int(seed), *map(int, words)]).generate_state(1)[0])


def steps_per_epoch(
    num_records: int,
    global_batch_size: int,
    *,
    balanced_classes: int | None = None,
) -> int:
    """Full global batches in one epoch, as `make_train_dataset` defines an epoch.

    An epoch is a permutation of the whole dataset (shared by all processes), so this does not
    depend on the process count.
    """
    size = num_records
    if balanced_classes:
        size = max(1, size // balanced_classes) * balanced_classes
    return size // global_batch_size


class _Reindexed(grain.MapDataset):
    """Element i is the parent's element `_parent_index(i)`; subclasses set `_length`."""

    _length: int

    def _parent_index(self, index: int) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(int(index))]


class ProcessSlice(_Reindexed):
    """This process's rows of every global batch of `parent` (a stream of examples).

    Local index i maps to global position (i // local) * global + p * local + i % local, so
    the processes together see exactly the global batches a single process would: the same
    shuffle, the same augmentation keys, the same training run for any process count.
    """

    def __init__(
        self, parent: grain.MapDataset, *, global_batch: int, local_batch: int, process_index: int
    ):
        super().__init__(parent)
        self._global = global_batch
        self._local = local_batch
        self._offset = process_index * local_batch
        self._length = (len(parent) // global_batch) * local_batch

    def _parent_index(self, index: int) -> int:
        batch, row = divmod(index, self._local)
        return batch * self._global + self._offset + row

    def __str__(self) -> str:
        return f"ProcessSlice(global={self._global}, local={self._local}, offset={self._offset})"


class _EpochPlans(_Reindexed):
    """Epochs of `parent` laid out by a per-epoch plan (positions into the parent).

    Plans are computed once per epoch and a few are kept (threads read neighbouring epochs at
    a boundary), so an element costs one array lookup.
    """

    def __init__(self, parent: grain.MapDataset, epoch_length: int, num_epochs: int | None):
        super().__init__(parent)
        self._epoch_length = epoch_length
        self._length = sys.maxsize if num_epochs is None else num_epochs * epoch_length
        self._init_cache()

    def _init_cache(self):
        self._lock = threading.Lock()
        self._plans: dict[int, np.ndarray] = {}

    def __getstate__(self):
        # Worker processes get a copy without the lock and rebuild plans on demand.
        state = dict(self.__dict__)
        del state["_lock"], state["_plans"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_cache()

    def _make_plan(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def _plan(self, epoch: int) -> np.ndarray:
        with self._lock:
            plan = self._plans.get(epoch)
            if plan is None:
                plan = self._make_plan(epoch)
                if len(self._plans) >= 4:
                    self._plans.pop(min(self._plans))
                self._plans[epoch] = plan
            return plan

    def _parent_index(self, index: int) -> int:
        epoch, position = divmod(index, self._epoch_length)
        return int(self._plan(epoch)[position])


class ShuffledEpochs(_EpochPlans):
    """Every record once per epoch, in a fresh permutation per epoch (keyed by seed, epoch).

    Replaces `MapDataset.shuffle().repeat()`: Grain's per-element index shuffle costs ~1.6 ms
    per element on a 24-record set and ~40 us on 1,500 records (grain 0.2, this CPU), more
    than a small model's step; one numpy permutation per epoch costs microseconds.
    """

    def __init__(self, parent: grain.MapDataset, *, seed: int, num_epochs: int | None = None):
        if not len(parent):
            raise ValueError("cannot shuffle an empty dataset")
        super().__init__(parent, len(parent), num_epochs)
        self._seed = seed

    def _make_plan(self, epoch: int) -> np.ndarray:
        words = [int(self._seed), int(epoch)]
        return np.random.default_rng(np.random.SeedSequence(words)).permutation(self._epoch_length)

    def __str__(self) -> str:
        return f"ShuffledEpochs(records={self._epoch_length})"


class BalancedEpochs(_EpochPlans):
    """Class-balanced epochs over `parent`; epoch e is `mixing.balanced_epoch(..., epoch=e)`."""

    def __init__(
        self,
        parent: grain.MapDataset,
        labels: np.ndarray,
        num_classes: int,
        *,
        seed: int,
        num_epochs: int | None = None,
    ):
        if len(labels) != len(parent):
            raise ValueError(f"{len(labels)} labels for a dataset of {len(parent)} records")
        self._labels = np.asarray(labels)
        self._num_classes = num_classes
        self._seed = seed
        # Epoch length close to the shard size, a multiple of the class count.
        self._per_class = max(1, len(parent) // num_classes)
        super().__init__(parent, self._per_class * num_classes, num_epochs)
        mixing.balanced_epoch(self._labels, num_classes, 1, seed=seed, epoch=0)  # Fails early.

    def _make_plan(self, epoch: int) -> np.ndarray:
        return mixing.balanced_epoch(
            self._labels, self._num_classes, self._per_class, seed=self._seed, epoch=epoch
        )

    def __str__(self) -> str:
        return f"BalancedEpochs(per_class={self._per_class}, classes={self._num_classes})"


class DecodeOrMask(grain.MapDataset):
    """Decodes `image`; an unreadable record is replaced by the next readable one, masked.

    The substitute is the record at the next position of the same (shuffled) stream, so the
    result depends only on the position: batches stay identical for any process or worker
    count, and a resumed run sees the same substitutes.
    """

    def __init__(self, parent: grain.MapDataset):
        super().__init__(parent)

    def __len__(self) -> int:
        return len(self._parent)

    def _decoded(self, index: int) -> dict:
        record = dict(self._parent[index % len(self._parent)])
        name = transforms.record_name(record)
        record["image"] = imageio.decode_gray(record["image"], name=name)
        return record

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        index = int(index)
        try:
            record = self._decoded(index)
            record["mask"] = np.bool_(True)
            return record
        except imageio.CorruptImageError as error:
            logging.warning("masking unreadable training record at stream position %d: %s",
                            index, error)  # fmt: skip
            first_error = error
        for offset in range(1, _MAX_SUBSTITUTE_DISTANCE + 1):
            try:
                record = self._decoded(index + offset)
            except imageio.CorruptImageError:
                continue
            record["mask"] = np.bool_(False)
            return record
        raise imageio.CorruptImageError(
            f"{first_error} and the next {_MAX_SUBSTITUTE_DISTANCE} records of the stream are "
            "unreadable too; the dataset looks broken"
        )

    def __str__(self) -> str:
        return "DecodeOrMask()"


class DecodedOnce:
    """A record source decoded and resized on each record's first read, then served from memory.

    A training run reads every record once per epoch; for a dataset whose decoded images fit
    in memory (PneumoniaMNIST, Kermany at 128 px) the read, TFDS's record parsing and the
    PNG decode cost more CPU than a small model's train step, on the cores that run it.
    Holds about len(source) * size**2 bytes, filled lazily (by each worker, with workers).
    """

    _STRIPES = 64  # locks, so that two reader threads never decode the same record twice

    def __init__(self, source: Any, size: int, content: int = 0):
        self._source = source
        self._decode = transforms.DecodeImage()
        self._resize = transforms.ResizeImage(size, content)
        self._records: list[dict | None] = [None] * len(source)
        self._init_locks()

    def _init_locks(self):
        self._locks = [threading.Lock() for _ in range(self._STRIPES)]

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_locks"]  # worker processes get their own
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_locks()

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        record = self._records[index]
        if record is None:
            with self._locks[index % self._STRIPES]:
                record = self._records[index]
                if record is None:
                    record = self._resize.map(self._decode.map(self._source[index]))
                    self._records[index] = record
        return dict(record)

    def __str__(self) -> str:
        return f"DecodedOnce({self._source})"


def decoded_fits(num_records: int, resolution: int, budget_mb: float) -> bool:
    """Whether `num_records` gray images at `resolution` px fit in `budget_mb` MiB."""
    return num_records * resolution * resolution <= budget_mb * 2**20


def _resolution(resolution: int | None, spec: sources.DatasetSpec) -> int:
    resolution = spec.resolution if resolution is None else resolution
    if resolution is None or resolution <= 0:
        raise ValueError(f"{spec.name}: give a positive resolution (the spec has none)")
    return int(resolution)


def _finish(
    ds: grain.MapDataset,
    *,
    batch_size: int,
    drop_remainder: bool,
    num_workers: int,
    num_threads: int,
) -> grain.IterDataset:
    """Batches in the MapDataset (so batches do not depend on workers), then prefetches."""
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    # Elements are whole batches here: a few in flight per thread bound the host memory.
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * max(1, num_threads))
    iter_ds = ds.to_iter_dataset(read)
    if num_workers > 0:
        # Grain reads an absl flag when starting workers with jax's profiler loaded; outside an
        # absl app (tests, notebooks, benchmarks) the flags are unparsed, so use the defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2)
        iter_ds = iter_ds.mp_prefetch(options)
    return iter_ds


def _to_model_inputs(normalization, spec: sources.DatasetSpec, keys) -> transforms.Chain:
    """Float image, typed label, only `keys`: the last per-record stage, as one Grain stage."""
    return transforms.Chain(
        (
            transforms.ToFloat(normalization),
            transforms.CastLabel(spec.label_kind, spec.num_classes),
            transforms.SelectFields(tuple(keys)),
        )
    )


def make_train_dataset(
    source: Any,
    spec: sources.DatasetSpec,
    *,
    global_batch_size: int,
    seed: int,
    resolution: int | None = None,
    content_resolution: int = 0,
    augment: Any = None,
    normalization: Any = "generator",
    balanced: bool = False,
    labels: np.ndarray | None = None,
    num_epochs: int | None = None,
    num_workers: int = 0,
    num_threads: int = 2,
    bad_records: str = "error",
    cache_mb: float = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    device_count: int | None = None,
) -> grain.IterDataset:
    """Training batches for this process: dicts with TRAIN_KEYS, leading dim global/process_count.

    `source`: a record source, a `mixing.Part`, a list of Parts or a `mixing.MixedSource`.
    `content_resolution` > 0: films are resized to it and reflect-padded to `resolution`
    (a generator canvas around native-size films; `imageio.fit_square`).
    `augment`: AugmentConfig, Mapping or ConfigDict (None = defaults; `enabled=False` = none).
    `normalization`: a preset ("generator" = [-1, 1], "unit", "imagenet"), (mean, std) or Mapping.
    `balanced`: every epoch draws each class equally (multi-class only); `labels` aligned with
    `source` skip reading them (see `mixing.read_labels` for a cached read).
    `num_epochs`: None repeats forever. Each epoch is a fresh shuffle of the whole dataset;
    batches run across epoch boundaries, so only the very last partial batch is dropped.
    Process p gets rows [p * B/P, (p + 1) * B/P) of every global batch of B: the run is the
    same for any process count at the same global batch.
    `bad_records`: "error" (an unreadable image stops the run, naming the record) or "mask"
    (it is logged and replaced by the next readable record with `mask` False; batches then
    carry a bool `mask` field). See BAD_RECORD_POLICIES.
    `cache_mb` > 0: a source whose decoded images fit in that many MiB is decoded once and
    kept in memory (`DecodedOnce`; "error" policy only). The batches are the same.
    """
    if bad_records not in BAD_RECORD_POLICIES:
        raise ValueError(f"bad_records must be one of {BAD_RECORD_POLICIES}, got {bad_records!r}")
    topology = resolve_topology(process_index, process_count, device_count)
    batch_size = local_batch_size(global_batch_size, topology)
    resolution = _resolution(resolution, spec)
    augment = transforms.AugmentConfig.from_config(augment)
    normalization = transforms.Normalization.from_config(normalization)
    mixed = mixing.as_mixed(source)

    # One global example stream, identical on every process: shuffled (or class-balanced) per
    # epoch, decoded and augmented lazily by stream position; each process then reads only its
    # rows of each global batch (ProcessSlice), so its reads are disjoint from the others'.
    # Decoding once: a strict run ("error") only; "mask" substitutes by stream position.
    decoded_once = bad_records == "error" and decoded_fits(len(mixed), resolution, cache_mb)
    if decoded_once:
        ds = grain.MapDataset.source(DecodedOnce(mixed, resolution, content_resolution))
    else:
        ds = grain.MapDataset.source(mixed)
    if balanced:
        labels = mixing.read_labels(mixed) if labels is None else np.asarray(labels)
        if len(labels) != len(mixed):
            raise ValueError(f"{len(labels)} labels given for a source of {len(mixed)} records")
        mixing.check_balanceable(labels, spec)
        ds = BalancedEpochs(
            ds, labels, spec.num_classes, seed=derive_seed(seed, 1), num_epochs=num_epochs
        )
    else:
        ds = ShuffledEpochs(ds, seed=derive_seed(seed, 1), num_epochs=num_epochs)
    if num_epochs is not None and len(ds) < global_batch_size:
        raise ValueError(
            f"{len(ds)} records over {num_epochs} epochs make no batch of {global_batch_size}"
        )

    if bad_records == "mask":
        ds = DecodeOrMask(ds)
    elif not decoded_once:
        ds = ds.map(transforms.DecodeImage())
    if not decoded_once:
        ds = ds.map(transforms.ResizeImage(resolution, content_resolution))
    if augment.enabled:
        # The rng is keyed by (seed, position in the repeated stream) = (seed, epoch, index).
        ds = ds.random_map(transforms.RandomAugment(augment), seed=derive_seed(seed, 2))
    keys = (*TRAIN_KEYS, "mask") if bad_records == "mask" else TRAIN_KEYS
    ds = ds.map(_to_model_inputs(normalization, spec, keys))
    ds = ProcessSlice(
        ds,
        global_batch=global_batch_size,
        local_batch=batch_size,
        process_index=topology.process_index,
    )
    return _finish(
        ds,
        batch_size=batch_size,
        drop_remainder=True,
        num_workers=num_workers,
        num_threads=num_threads,
    )


def make_train_iterator(*args, **kwargs) -> grain.DatasetIterator:
    """`iter(make_train_dataset(...))`: a checkpointable iterator (get_state / set_state)."""
    return iter(make_train_dataset(*args, **kwargs))


class _EvalShard:
    """Random-access view of one process's eval positions; -1 marks a padding record."""

    def __init__(self, mixed: mixing.MixedSource, positions: np.ndarray, pad: dict):
        self._mixed = mixed
        self._positions = positions
        self._pad = pad

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, index: int) -> dict:
        position = int(self._positions[index])
        if position < 0:
            return dict(self._pad)
        record = self._mixed[position]
        record["mask"] = np.bool_(True)
        return record


def eval_num_batches(num_records: int, global_batch_size: int, process_count: int = 1) -> int:
    """Batches every process yields for eval (the same on all, the last ones padded)."""
    per_process = math.ceil(num_records / process_count)
    return max(1, math.ceil(per_process / (global_batch_size // process_count)))


def make_eval_dataset(
    source: Any,
    spec: sources.DatasetSpec,
    *,
    global_batch_size: int,
    resolution: int | None = None,
    content_resolution: int = 0,
    normalization: Any = "generator",
    num_workers: int = 0,
    num_threads: int = 2,
    cache_mb: float = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    device_count: int | None = None,
) -> grain.IterDataset:
    """Eval batches: no augmentation, fixed order, every record exactly once over all processes.

    Process p reads the contiguous block [p * ceil(N / P), ...). Every process yields
    `eval_num_batches(...)` full batches; padding rows have `mask` False, `index` -1 and id "".
    Batches carry EVAL_KEYS; `id` (str) and `index` match predictions to records. Iterating the
    returned dataset again starts from the beginning. `content_resolution` as for training.
    `cache_mb` > 0: when this process's decoded images fit, they are decoded on the first pass
    and kept (`DecodedOnce`), so iterating the same dataset again (periodic validation) reads
    and decodes nothing. The batches are the same.
    """
    topology = resolve_topology(process_index, process_count, device_count)
    batch_size = local_batch_size(global_batch_size, topology)
    resolution = _resolution(resolution, spec)
    normalization = transforms.Normalization.from_config(normalization)
    mixed = mixing.as_mixed(source)
    if len(mixed) == 0:
        raise ValueError(f"{spec.name}: empty eval source")
    per_process = math.ceil(len(mixed) / topology.process_count)
    start = min(len(mixed), topology.process_index * per_process)
    stop = min(len(mixed), start + per_process)
    num_batches = eval_num_batches(len(mixed), global_batch_size, topology.process_count)
    positions = np.full(num_batches * batch_size, -1, dtype=np.int64)
    positions[: stop - start] = np.arange(start, stop)
    pad_label = 0 if spec.label_kind == sources.MULTICLASS else np.zeros(spec.num_classes)
    pad = {
        "image": np.zeros((resolution, resolution), np.uint8),
        "label": pad_label,
        "id": "",
        "index": np.int32(-1),
        "source": np.int32(-1),
        "is_synthetic": np.bool_(False),
        "mask": np.bool_(False),
    }
    shard = _EvalShard(mixed, positions, pad)
    if decoded_fits(len(positions), resolution, cache_mb):
        ds = grain.MapDataset.source(DecodedOnce(shard, resolution, content_resolution))
    else:
        resize = transforms.ResizeImage(resolution, content_resolution)
        ds = grain.MapDataset.source(shard).map(transforms.DecodeImage()).map(resize)
    ds = ds.map(_to_model_inputs(normalization, spec, EVAL_KEYS))
    return _finish(
        ds,
        batch_size=batch_size,
        drop_remainder=False,
        num_workers=num_workers,
        num_threads=num_threads,
    )


def device_fields(batch: dict) -> dict:
    """The batch without host-only (string) fields, for jax.make_array_from_process_local_data."""
    return {key: value for key, value in batch.items() if key not in HOST_ONLY_KEYS}


def checkpoint_save_args(iterator: grain.DatasetIterator) -> Any:
    """Orbax save args for the iterator: `ocp.args.Composite(data=checkpoint_save_args(it))`.

    Grain's handler writes one JSON file per process (process_{i}-of-{n}.json), so every
    process must save and restore its own iterator.
    """
    return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_restore_args(iterator: grain.DatasetIterator) -> Any:
    """Orbax restore args: restores state into `iterator` (a fresh one, same pipeline args)."""
    return grain.checkpoint.CheckpointRestore(iterator)


def describe_batches(
    iterator: Iterator[dict], num_batches: int = 2, spec: sources.DatasetSpec | None = None
) -> dict:
    """Shapes, value range and label counts of the next `num_batches` batches (consumed)."""
    batches = [next(iterator) for _ in range(num_batches)]
    first = batches[0]
    mask = np.concatenate([b.get("mask", np.ones(len(b["label"]), bool)) for b in batches])
    images = np.concatenate([b["image"] for b in batches])[mask]
    labels = np.concatenate([b["label"] for b in batches])[mask]
    if labels.ndim == 1:
        minlength = spec.num_classes if spec else int(labels.max()) + 1
        counts = np.bincount(labels, minlength=minlength)
    else:
        counts = labels.sum(axis=0)
    description = {
        "batches": num_batches,
        "fields": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in first.items()},
        "image": {
            "min": float(images.min()),
            "max": float(images.max()),
            "mean": float(images.mean()),
            "std": float(images.std()),
        },
        "label_counts": [int(c) for c in counts],
        "examples": int(mask.sum()),
        "padding": int((~mask).sum()),
    }
    if "is_synthetic" in first:
        synthetic = np.concatenate([b["is_synthetic"] for b in batches])[mask]
        description["synthetic_fraction"] = float(synthetic.mean())
    if spec is not None:
        description["class_names"] = list(spec.class_names)
    return description
