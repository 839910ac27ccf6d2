"""The paper's experiment end to end: scarce real data -> generators -> classifier arms -> report.

  results = experiment.run(get_config("demo"), "/tmp/exp")   # configs/experiment.py

Stage 1 (data and synthesis) keeps a fraction of one class of the training split
(`mixing.scarce_indices` via `mixing.training_subset`, the same helper every driver uses),
trains PGGAN and DDPM on that scarce split only, synthesizes the scarce class and measures the
synthetic images' quality against held-out real images (`cxrjax.quality`). Stage 2 trains the
classifier arms over several seeds. Stage 3 evaluates on the real test split: metrics with
bootstrap and across-seed CIs, DeLong tests of every arm against arms (a) and (b) on the
seed-averaged scores, anomaly detection with normal-only generators; then results.json and
report.md.

Every sub-run has its own sub-workdir and is the job family's own driver, so re-running skips
finished sub-runs (their results.json) and resumes interrupted training from checkpoints.
SIGTERM/SIGINT stop the run at the next safe point (training saves its current step first) and
`run` raises `Preempted`.

The test split is never used to train or to choose anything, by construction: every sub-run's
config has train and validation splits different from `data.test_split` (checked before any
work), classifier and anomaly thresholds and checkpoints come from validation inside their
drivers, and the quality report compares with `quality.real_split`. results.json records which
split fed each decision (`split_use`) and `check_results` verifies it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from cxrjax import config as config_lib
from cxrjax import parallel, report
from cxrjax.data import imageio, mixing, sources
from cxrjax.metrics import classification as cls_metrics
from cxrjax.train import results as results_lib

ARMS = ("real_scarce", "baseline", "pggan", "ddpm", "real_full")
ARM_LABELS = {
    "real_scarce": "(a) real scarce",
    "baseline": "(b) real scarce + augmentation + re-weighting",
    "pggan": "(c) real scarce + PGGAN synthetic",
    "ddpm": "(d) real scarce + DDPM synthetic",
    "real_full": "(e) full real training data",
}
GENERATORS = ("pggan", "ddpm")
REFERENCES = ("real_scarce", "baseline")
METRICS = ("auc", "precision", "recall", "specificity", "f1", "accuracy")
ANOMALY_METHODS = ("fanogan", "ddpm")
STAGES = ("data_and_synthesis", "classifier_arms", "evaluation")


class Preempted(Exception):
    """A signal stopped the experiment at a safe point; re-running the command resumes."""

    def __init__(self, where: str, signal_name: str | None = None):
        self.where = where
        self.signal_name = signal_name or "signal"
        super().__init__(
            f"preempted ({self.signal_name}) {where}; finished sub-runs and the last "
            "checkpoint are saved. Re-run the same command to resume."
        )


class _StopFlag:
    """SIGTERM/SIGINT -> a flag polled between sub-runs.

    Training loops install their own handlers while they run (they save and return
    "preempted"), and a signal landing in a loop's last moments (its final save) is taken by
    the loop's handler without stopping anything. So the flag also watches the interpreter's
    wakeup fd, which receives every handled signal's number whichever handler is installed.
    """

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self._previous_fd: int | None = None
        self._pipe: tuple[int, int] | None = None
        self.signal_name: str | None = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self._SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._previous_fd = signal.set_wakeup_fd(write_fd)
        return self

    def __exit__(self, *exc) -> None:
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_fd if self._previous_fd is not None else -1)
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        del frame
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def _drain(self) -> None:
        if self._pipe is None:
            return
        try:
            data = os.read(self._pipe[0], 4096)
        except BlockingIOError:
            return
        for number in data:
            if number in self._SIGNALS:
                self.signal_name = self.signal_name or signal.Signals(number).name
                self._event.set()

    def check(self, where: str) -> None:
        self._drain()
        if self._event.is_set():
            raise Preempted(where, self.signal_name)


# ----------------------------------------------------------------------------- plan
def _copy(config) -> ml_collections.ConfigDict:
    """An unlocked deep copy of a (possibly locked) sub-config."""
    return ml_collections.ConfigDict(config_lib.to_dict(config))


def _set_data(sub, data, *, resolution: bool) -> None:
    """The experiment's dataset identity and splits into a sub-config's data block."""
    fields = ("name", "data_dir", "manual_dir", "labels", "skip_corrupt", "num_workers")
    for field in fields:
        sub.data[field] = data[field]
    sub.data.train_split = data.train_split
    for role in ("val_split", "test_split"):
        if role in sub.data:
            sub.data[role] = data[role]
    if resolution:
        sub.data.resolution = data.resolution


def _keep(sub, scarcity) -> None:
    sub.data.update(
        keep_class=scarcity.class_name,
        keep_fraction=float(scarcity.fraction),
        keep_seed=int(scarcity.seed),
    )


def needed_generators(config) -> tuple[str, ...]:
    return tuple(g for g in GENERATORS if g in config.arms)


def generator_config(config, kind: str) -> ml_collections.ConfigDict:
    """PGGAN / DDPM on the scarce training split (unconditional ones: its scarce class only)."""
    sub = _copy(config[kind])
    _set_data(sub, config.data, resolution=False)
    if kind == "pggan" and not sub.data.source_resolution:
        sub.data.source_resolution = config.data.resolution
    _keep(sub, config.scarcity)
    if not sub.model.conditional:
        sub.data.only_class = config.scarcity.class_name
    return sub


def anomaly_generator_config(config, kind: str) -> ml_collections.ConfigDict:
    """PGGAN / DDPM trained on the normal training images only (for anomaly detection)."""
    sub = _copy(config[f"anomaly_{kind}"])
    _set_data(sub, config.data, resolution=False)
    if kind == "pggan" and not sub.data.source_resolution:
        sub.data.source_resolution = config.data.resolution
    sub.data.only_class = config.anomaly.normal_class
    return sub


def classifier_config(config, arm: str, seed: int, workdir: str) -> ml_collections.ConfigDict:
    """One arm's classifier config: the shared recipe plus what the arm changes."""
    sub = _copy(config.classifier)
    _set_data(sub, config.data, resolution=True)
    sub.seed = int(seed)
    sub.eval.update(bootstrap=int(config.eval.bootstrap), confidence=float(config.eval.confidence))
    if arm != "real_full":
        _keep(sub, config.scarcity)
    if arm == "baseline":
        sub.data.augment.enabled = bool(config.baseline.augment)
        sub.loss.class_weighting = config.baseline.class_weighting
    if arm in GENERATORS:
        sub.data.synthetic.update(
            manual_dir=synthetic_dir(workdir, arm),
            folder_name=f"experiment_{arm}",
            data_dir=os.path.join(workdir, "datasets"),
            count=0,  # every synthesized image
            fraction=0.0,
            label="" if config[arm].model.conditional else config.scarcity.class_name,
        )
    return sub


def anomaly_config(config, method: str, workdir: str) -> ml_collections.ConfigDict:
    key = "fanogan" if method == "fanogan" else "ddpm_score"
    sub = _copy(config[key])
    kind = "pggan" if method == "fanogan" else "ddpm"
    if config.anomaly.generators == "dedicated":
        sub.generator_workdir = os.path.join(workdir, "anomaly", f"{kind}_normal")
    else:
        sub.generator_workdir = os.path.join(workdir, kind)
    sub.data.update(
        data_dir=config.data.data_dir,
        normal_class=config.anomaly.normal_class,
        train_split=config.data.train_split,
        val_split=config.data.val_split,
        test_split=config.data.test_split,
        num_workers=config.data.num_workers,
    )
    return sub


def synthetic_dir(workdir: str, kind: str) -> str:
    return os.path.join(workdir, "synthetic", kind)


def plan(config, workdir: str) -> dict[str, tuple[str, str, ml_collections.ConfigDict]]:
    """Every sub-run: {name: (driver kind, sub-workdir, config)}, in run order."""
    runs: dict[str, tuple[str, str, ml_collections.ConfigDict]] = {}
    for kind in needed_generators(config):
        runs[kind] = (kind, os.path.join(workdir, kind), generator_config(config, kind))
    for arm in config.arms:
        for seed in range(int(config.seeds)):
            sub = os.path.join(workdir, "arms", arm, f"seed{seed}")
            runs[f"arms/{arm}/seed{seed}"] = (
                "classifier",
                sub,
                classifier_config(config, arm, seed, workdir),
            )
    if config.anomaly.enabled:
        if config.anomaly.generators == "dedicated":
            for method in config.anomaly.methods:
                kind = "pggan" if method == "fanogan" else "ddpm"
                name = f"anomaly/{kind}_normal"
                runs[name] = (
                    kind,
                    os.path.join(workdir, name),
                    anomaly_generator_config(config, kind),
                )
        for method in config.anomaly.methods:
            name = f"anomaly/{method}"
            runs[name] = (
                "anomaly",
                os.path.join(workdir, name),
                anomaly_config(config, method, workdir),
            )
    return runs


def _driver(kind: str):
    if kind == "classifier":
        from cxrjax.train import classifier_run as driver
    elif kind == "pggan":
        from cxrjax.train import gan_run as driver
    elif kind == "ddpm":
        from cxrjax.train import diffusion_run as driver
    else:
        from cxrjax.train import anomaly_run as driver
    return driver


def training_splits(kind: str, sub) -> list[str]:
    """The dataset splits a sub-run trains on (anomaly: the generator's and the encoder's)."""
    if kind == "anomaly":
        return [sub.data.train_split]
    splits = [sub.data.train_split]
    if kind == "classifier" and sub.data.synthetic.manual_dir:
        splits.append("synthetic")
    return splits


# ----------------------------------------------------------------------------- validation
def validate(config, workdir: str | None = None) -> None:
    """Every experiment field and every sub-run config, checked before any data read."""
    check = config_lib.check
    arms = tuple(config.arms)
    check(bool(arms) and len(set(arms)) == len(arms), "arms", "must be distinct, non-empty")
    unknown = sorted(set(arms) - set(ARMS))
    check(not unknown, "arms", f"unknown arms {unknown}; choose from {ARMS}")
    check(isinstance(config.seeds, int) and config.seeds >= 1, "seeds", "must be an int >= 1")
    data = config.data
    check(data.train_split != data.test_split, "data.train_split", "must differ from test_split")
    check(data.val_split != data.test_split, "data.val_split", "must differ from test_split")
    check(data.val_split != data.train_split, "data.val_split", "must differ from train_split")
    check(bool(config.scarcity.class_name), "scarcity.class_name", "must name a class")
    check(
        0.0 < config.scarcity.fraction <= 1.0,
        "scarcity.fraction",
        f"must be in (0, 1], got {config.scarcity.fraction}",
    )
    synthesis = config.synthesis
    check(synthesis.balance > 0 or synthesis.count > 0, "synthesis.balance", "must be > 0")
    check(synthesis.count >= 0, "synthesis.count", "must be >= 0")
    check(synthesis.quality_per_class >= 0, "synthesis.quality_per_class", "must be >= 0")
    check(synthesis.steps >= 1 and synthesis.batch_size >= 1, "synthesis.steps", "must be >= 1")
    config_lib.check_choice(config, "synthesis.sampler", ("ddim", "ddpm"))
    check(
        config.quality.real_split != data.test_split,
        "quality.real_split",
        "must not be the test split (the test split only gives the final numbers)",
    )
    if config.quality.enabled:
        from cxrjax import features

        features.parse_spec(config.quality.extractor)
    config_lib.check_choice(config, "baseline.class_weighting", ("none", "balanced"))
    config_lib.check_choice(config, "anomaly.generators", ("dedicated", "shared"))
    methods = tuple(config.anomaly.methods)
    bad = sorted(set(methods) - set(ANOMALY_METHODS))
    check(not bad, "anomaly.methods", f"unknown methods {bad}; choose from {ANOMALY_METHODS}")
    check(0.0 < config.eval.confidence < 1.0, "eval.confidence", "must be in (0, 1)")
    check(0.0 < config.eval.alpha < 1.0, "eval.alpha", "must be in (0, 1)")
    check(config.eval.bootstrap >= 0, "eval.bootstrap", "must be >= 0")
    if config.anomaly.enabled and config.anomaly.generators == "shared":
        for method in methods:
            kind = "pggan" if method == "fanogan" else "ddpm"
            check(
                kind in needed_generators(config),
                "anomaly.generators",
                f"'shared' needs the {kind} arm (its generator); use 'dedicated'",
            )
    runs = plan(config, workdir or "/nonexistent-experiment-workdir")
    for name, (kind, _, sub) in runs.items():
        if kind == "anomaly":
            try:
                _driver(kind).validate(sub)
            except config_lib.ConfigError as error:
                raise config_lib.ConfigError(f"{name}: {error}") from None
            continue
        # Synthetic folders do not exist yet: validate the rest of the classifier config.
        checked = _copy(sub)
        if kind == "classifier":
            checked.data.synthetic.manual_dir = ""
        try:
            _driver(kind).validate(checked)
        except config_lib.ConfigError as error:
            raise config_lib.ConfigError(f"{name}: {error}") from None
        for split in training_splits(kind, sub):
            # The invariant itself, on the exact configs that will run.
            check(split != data.test_split, "data", f"{name} would train on the test split")


# ----------------------------------------------------------------------------- helpers
def _log(stage: int, message: str, *args) -> None:
    logging.info(f"[experiment stage {stage}/3 {STAGES[stage - 1]}] {message}", *args)


def _finished(result: Mapping[str, Any], name: str, stop: _StopFlag) -> Mapping[str, Any]:
    if result.get("finished") is False:
        stop._drain()
        raise Preempted(f"during {name} (step {result.get('step')})", stop.signal_name)
    stop.check(f"after {name}")
    return result


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _sync(name: str) -> None:
    """All processes wait here (files written by process 0 are then visible to the others)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def class_counts(labels: np.ndarray, class_names: Sequence[str]) -> dict[str, int]:
    labels = np.asarray(labels)
    return {name: int(len(mixing.class_indices(labels, name, class_names))) for name in class_names}


def _decode(source, indices: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [N, R, R] images of `indices` of a record source, resized if needed."""
    images = []
    getitems = getattr(source, "__getitems__", None)
    for start in range(0, len(indices), 512):
        chunk = [int(i) for i in indices[start : start + 512]]
        records = getitems(chunk) if getitems else [source[i] for i in chunk]
        for index, record in zip(chunk, records, strict=True):
            image = imageio.decode_gray(record["image"], f"record {index}")
            if image.shape != (resolution, resolution):
                image = imageio.resize_square(image, resolution)
            images.append(image)
    return np.stack(images) if images else np.zeros((0, resolution, resolution), np.uint8)


def _cap(indices: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if limit <= 0 or len(indices) <= limit:
        return np.asarray(indices)
    return np.sort(np.random.default_rng(seed).choice(indices, size=limit, replace=False))


# ----------------------------------------------------------------------------- stage 1
def prepare_data(config, workdir: str, stop: _StopFlag) -> dict[str, Any]:
    """Opens the real splits; the scarce subset and every count the report needs."""
    from cxrjax.train import classifier_run

    reference = classifier_config(config, "real_full", 0, "/unused")
    splits, spec = classifier_run.load_splits(reference.data)
    cache = os.path.join(workdir, "labels")
    os.makedirs(cache, exist_ok=True)
    labels = {
        role: mixing.read_labels(
            source,
            os.path.join(
                cache, f"{spec.name.replace('/', '_')}_{reference.data[role + '_split']}.npy"
            ),
        )
        for role, source in splits.items()
    }
    scarce_data = {
        "keep_class": config.scarcity.class_name,
        "keep_fraction": float(config.scarcity.fraction),
        "keep_seed": int(config.scarcity.seed),
    }
    scarce = mixing.training_subset(splits["train"], spec, scarce_data, labels=labels["train"])
    kept = scarce.selected()
    counts = {role: class_counts(labels[role], spec.class_names) for role in labels}
    scarce_counts = class_counts(labels["train"][kept], spec.class_names)
    info = {
        "name": spec.name,
        "class_names": list(spec.class_names),
        "label_kind": spec.label_kind,
        "resolution": int(config.data.resolution),
        "split_names": {
            "train": config.data.train_split,
            "val": config.data.val_split,
            "test": config.data.test_split,
        },
        "split_sizes": {role: int(len(source)) for role, source in splits.items()},
        "class_counts": counts,
        "scarce_train": {"records": int(len(kept)), "per_class": scarce_counts},
    }
    _log(
        1,
        "%s: train %d / val %d / test %d; scarce training split keeps %d of %d %r (%d records)",
        spec.name,
        len(splits["train"]),
        len(splits["val"]),
        len(splits["test"]),
        scarce_counts[config.scarcity.class_name],
        counts["train"][config.scarcity.class_name],
        config.scarcity.class_name,
        len(kept),
    )
    stop.check("after data preparation")
    return {"info": info, "splits": splits, "spec": spec, "labels": labels, "kept": kept}


def synthetic_count(config, info: Mapping[str, Any]) -> int:
    """Scarce-class images to synthesize: `synthesis.count`, else back to `balance` x full."""
    if config.synthesis.count:
        return int(config.synthesis.count)
    name = config.scarcity.class_name
    target = mixing.round_half_up(config.synthesis.balance * info["class_counts"]["train"][name])
    count = target - info["scarce_train"]["per_class"][name]
    if count < 1:
        raise config_lib.ConfigError(
            f"config.synthesis.balance: {config.synthesis.balance} asks for no synthetic "
            f"{name!r} images (the scarce split already holds {target}); raise it or set "
            "synthesis.count"
        )
    return int(count)


def _synthesize(kind: str, generator_dir: str, output: str, *, num_images, label, seed, config):
    """synthesis.synthesize unless `output` already holds this exact set (provenance)."""
    from cxrjax import synthesis

    provenance = _read_json(os.path.join(output, "provenance.json"))
    if (
        provenance is not None
        and provenance.get("num_images") == num_images
        and provenance.get("seed") == seed
    ):
        return provenance
    if os.path.isdir(output) and parallel.is_main_process():
        shutil.rmtree(output)  # an interrupted synthesis: start this set again
    _sync(f"rm {output}")
    s = config.synthesis
    provenance = synthesis.synthesize(
        kind,
        generator_dir,
        num_images=int(num_images),
        output=output,
        label=label,
        seed=int(seed),
        batch_size=int(s.batch_size),
        sampler=s.sampler,
        steps=int(s.steps),
        guidance=None if s.guidance < 0 else float(s.guidance),
    )
    _sync(f"synthesized {output}")
    return provenance


def synthesize_all(config, workdir, data, generators, stop) -> dict[str, Any]:
    """The training set of each generator (scarce class) and its quality-only other classes."""
    spec = data["spec"]
    count = synthetic_count(config, data["info"])
    scarce = config.scarcity.class_name
    out = {}
    for kind in generators:
        conditional = bool(config[kind].model.conditional)
        generator_dir = os.path.join(workdir, kind)
        folder = synthetic_dir(workdir, kind)
        _log(1, "synthesizing %d %r images with %s -> %s", count, scarce, kind, folder)
        start = time.perf_counter()
        provenance = _synthesize(
            kind,
            generator_dir,
            folder,
            num_images=count,
            label=scarce if conditional else None,
            seed=config.synthesis.seed,
            config=config,
        )
        quality_folders = {}
        others = [c for c in spec.class_names if c != scarce]
        if (
            conditional
            and config.synthesis.quality_per_class
            and spec.label_kind == sources.MULTICLASS
        ):
            for offset, name in enumerate(others, start=1):
                quality_folder = f"{folder}_quality_{name}"
                _synthesize(
                    kind,
                    generator_dir,
                    quality_folder,
                    num_images=int(config.synthesis.quality_per_class),
                    label=name,
                    seed=config.synthesis.seed + offset,
                    config=config,
                )
                quality_folders[name] = quality_folder
        if parallel.is_main_process():
            # Prepared once here (the arms then only read it), not by every process at once.
            from cxrjax.train import classifier_run

            arm = classifier_config(config, kind, 0, workdir)
            classifier_run.load_synthetic(arm.data, spec)
        _sync(f"prepared {folder}")
        out[kind] = {
            "folder": folder,
            "count": int(count),
            "class": scarce,
            "conditional": conditional,
            "quality_folders": quality_folders,
            "provenance": provenance,
            "wall_time_s": results_lib.elapsed(start),
        }
        stop.check(f"after synthesis with {kind}")
    return out


def _load_synthetic_images(entry, class_names, scarce_index, resolution):
    """uint8 images and labels (indexing class_names) of a generator's synthetic folders."""
    from cxrjax import quality

    images, labels = [], []
    for folder in [entry["folder"], *entry["quality_folders"].values()]:
        image_set = quality.load_image_folder(folder, resolution=resolution)
        names = image_set.class_names
        if tuple(names) == ("synthetic",):  # unconditional: all of the scarce class
            lab = np.full(len(image_set.labels), scarce_index, np.int32)
        else:
            lookup = np.array([list(class_names).index(n) for n in names])
            lab = lookup[image_set.labels]
        images.append(image_set.images)
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def evaluate_quality(config, workdir, data, synthetic, stop) -> dict[str, Any]:
    """Synthetic-image quality per generator (cxrjax.quality) against held-out real images."""
    from cxrjax import quality
    from cxrjax.data import builders

    saved = {
        kind: _read_json(os.path.join(workdir, "quality", kind, "metrics.json"))
        for kind in synthetic
    }
    if all(metrics is not None for metrics in saved.values()):
        _log(1, "synthetic quality: finished reports in %s/quality", workdir)
        return saved
    spec = data["spec"]
    resolution = int(config.data.resolution)
    scarce = config.scarcity.class_name
    q = config.quality
    reference = classifier_config(config, "real_full", 0, "/unused")
    options = {
        "data_dir": reference.data.data_dir or None,
        "manual_dir": reference.data.manual_dir or None,
        "resolution": resolution,
        "skip_corrupt": reference.data.skip_corrupt,
    }
    if reference.data.labels:
        options["labels"] = reference.data.labels
    real_source, _ = builders.load(config.data.name, q.real_split, **options)
    real_labels_raw = mixing.read_labels(real_source)
    if spec.label_kind == sources.MULTICLASS:
        class_names = tuple(spec.class_names)
        real_labels = real_labels_raw.astype(np.int32)
        scarce_index = class_names.index(scarce)
    else:  # multi-label: the scarce finding vs every other image
        class_names = (scarce, f"not {scarce}")
        members = mixing.class_indices(real_labels_raw, scarce, spec.class_names)
        real_labels = np.ones(len(real_labels_raw), np.int32)
        real_labels[members] = 0
        scarce_index = 0
    real_idx = _cap(np.arange(len(real_source)), q.max_images, 0)
    real_images = _decode(real_source, real_idx, resolution)
    real_labels = real_labels[real_idx]
    train_idx = _cap(data["kept"], q.max_images, 1)
    train_images = _decode(data["splits"]["train"], train_idx, resolution)
    out = {}
    for kind, entry in synthetic.items():
        output_dir = os.path.join(workdir, "quality", kind)
        if saved[kind] is not None:
            out[kind] = saved[kind]
            continue
        _log(1, "synthetic quality of %s (%s features) -> %s", kind, q.extractor, output_dir)
        synth_images, synth_labels = _load_synthetic_images(
            entry, class_names, scarce_index, resolution
        )
        keep = _cap(np.arange(len(synth_images)), q.max_images, 2)
        out[kind] = quality.evaluate(
            real_images,
            real_labels,
            synth_images[keep],
            synth_labels[keep],
            train_images,
            q.extractor,
            class_names=class_names,
            data_ids={
                "real": f"{spec.name}:{q.real_split}",
                "synthetic": f"{kind}:{entry['folder']}",
                "train": f"{spec.name}:{config.data.train_split}:scarce",
            },
            cache_dir=os.path.join(workdir, "quality", "feature_cache"),
            batch_size=int(q.batch_size),
            seed=0,
            output_dir=output_dir,
            embedding=q.embedding,
            extra={
                "generator": kind,
                "real_split": q.real_split,
                "provenance": entry["provenance"],
            },
            kid_subset_size=int(q.kid_subset_size),
            kid_subsets=int(q.kid_subsets),
        )
        stop.check(f"after the quality report of {kind}")
    _sync("quality")
    return out


# ----------------------------------------------------------------------------- stage 3
def headline(result: Mapping[str, Any]) -> dict[str, Any]:
    """The report's metrics (with `_ci`): binary -> positive class, else the macro average."""
    source = result if "auc" in result else result.get("macro", {})
    out = {}
    for key in METRICS:
        if key == "accuracy" and "accuracy" in result and "auc" not in result:
            out[key], out[f"{key}_ci"] = result.get("accuracy"), result.get("accuracy_ci")
            continue
        out[key] = source.get(key)
        if f"{key}_ci" in source:
            out[f"{key}_ci"] = source[f"{key}_ci"]
    return out


def scarce_class_metrics(result: Mapping[str, Any], scarce: str) -> dict[str, Any] | None:
    """One-vs-rest metrics of the scarce class (multi-class / multi-label results)."""
    block = result.get("per_class", {}).get(scarce)
    if block is None:
        return None
    return {k: v for k, v in block.items() if k.removesuffix("_ci") in METRICS}


def target_scores(labels, probs, spec_info, scarce: str) -> tuple[np.ndarray, np.ndarray]:
    """(y, score) of the AUC that DeLong compares: binary -> the positive class; multi-class
    and multi-label -> one-vs-rest of the scarce class."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    names = spec_info["class_names"]
    if spec_info["label_kind"] == sources.MULTICLASS and len(names) == 2:
        return labels.astype(np.int64), probs[:, 1]
    index = names.index(scarce)
    if labels.ndim == 2:
        return (labels[:, index] > 0.5).astype(np.int64), probs[:, index]
    return (labels == index).astype(np.int64), probs[:, index]


def _predictions(workdir: str, split: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(workdir, f"{split}_predictions.npz")) as f:
        return {key: f[key] for key in f.files}


def _paired_t(values: Sequence[float], level: float) -> dict[str, Any]:
    return cls_metrics.aggregate_seeds([{"d": float(v)} for v in values], level)["d"]


def verdict(diff: float, p_value: float, alpha: float) -> str:
    """The arm's AUC against the reference's: higher / lower (DeLong p < alpha) or neither."""
    if p_value < alpha and diff > 0:
        return "higher AUC"
    if p_value < alpha and diff < 0:
        return "lower AUC"
    return "no detectable difference"


def evaluate_arms(config, workdir, info, runs) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-arm per-seed and aggregated test metrics, seed-averaged scores, DeLong tests."""
    level = float(config.eval.confidence)
    scarce = config.scarcity.class_name
    arms: dict[str, Any] = {}
    scores: dict[str, dict[str, np.ndarray]] = {}
    y_test = y_val = None
    for arm in config.arms:
        per_seed, test_probs, val_probs = [], [], []
        for seed in range(int(config.seeds)):
            name = f"arms/{arm}/seed{seed}"
            sub_workdir = runs[name][1]
            result = _read_json(os.path.join(sub_workdir, "results.json"))
            test, val = _predictions(sub_workdir, "test"), _predictions(sub_workdir, "val")
            if y_test is None:
                y_test, y_val = test["labels"], val["labels"]
            # Every run predicts the same test images in the same (record) order.
            assert np.array_equal(test["labels"], y_test) and np.array_equal(val["labels"], y_val)
            test_probs.append(test["probs"])
            val_probs.append(val["probs"])
            entry = {
                "seed": seed,
                "workdir": os.path.relpath(sub_workdir, workdir),
                "test": headline(result["test"]),
                "val": headline(result["val"]),
                "threshold": result["threshold"],
                "threshold_split": result["splits_used"]["threshold"],
                "checkpoint_selection_split": result["splits_used"]["checkpoint_selection"],
                "training_splits": result["splits_used"]["training"],
                "selected_step": result["selected_step"],
                "train_records": result["train_records"],
                "training_data": result["training_data"]["parts"],
                "wall_time_s": result.get("wall_time_s"),
            }
            scarce_block = scarce_class_metrics(result["test"], scarce)
            if scarce_block is not None:
                entry["test_scarce_class"] = scarce_block
            per_seed.append(entry)
        mean_test = np.mean(test_probs, axis=0)
        mean_val = np.mean(val_probs, axis=0)
        names = info["class_names"]
        threshold = cls_metrics.select_threshold(
            y_val, mean_val, config.classifier.eval.threshold, class_names=names
        )
        seed_mean_result = cls_metrics.evaluate(
            y_test,
            mean_test,
            threshold=threshold,
            class_names=names,
            n_bootstrap=int(config.eval.bootstrap),
            seed=0,
            level=level,
        )
        y, s = target_scores(y_test, mean_test, info, scarce)
        scores[arm] = {
            "seed_mean": s,
            "per_seed": [target_scores(y_test, p, info, scarce)[1] for p in test_probs],
        }
        arms[arm] = {
            "label": ARM_LABELS[arm],
            "per_seed": per_seed,
            "aggregate": cls_metrics.aggregate_seeds([e["test"] for e in per_seed], level),
            "seed_mean": {
                **headline(seed_mean_result),
                "threshold": threshold,
                "threshold_split": config.data.val_split,
            },
            "delong_auc_ci": cls_metrics.delong_auc_ci(y, s, level),
        }
    comparisons = []
    y_target = y  # the same test images and labels for every arm
    for arm in config.arms:
        arms[arm]["delong"] = {}
        for ref in REFERENCES:
            if ref not in config.arms or ref == arm:
                continue
            test = cls_metrics.delong_test(
                y_target, scores[arm]["seed_mean"], scores[ref]["seed_mean"], level
            )
            per_seed_p = [
                cls_metrics.delong_test(y_target, a, b, level)["p_value"]
                for a, b in zip(scores[arm]["per_seed"], scores[ref]["per_seed"], strict=True)
            ]
            diffs = [
                a["test"]["auc"] - b["test"]["auc"]
                for a, b in zip(arms[arm]["per_seed"], arms[ref]["per_seed"], strict=True)
                if a["test"]["auc"] is not None and b["test"]["auc"] is not None
            ]
            block = {
                "reference": ref,
                "auc_difference": test["difference"],
                "ci": test["ci"],
                "p_value": test["p_value"],
                "z": test["z"],
                "per_seed_p_values": per_seed_p,
                "per_seed_auc_difference": _paired_t(diffs, level) if diffs else None,
                "verdict": verdict(test["difference"], test["p_value"], config.eval.alpha),
            }
            arms[arm]["delong"][ref] = block
            comparisons.append({"arm": arm, **block})
    evaluation = {
        "test_images": int(len(y_test)),
        "delong_target": (
            f"positive class {info['class_names'][1]!r}"
            if info["label_kind"] == sources.MULTICLASS and len(info["class_names"]) == 2
            else f"one-vs-rest {scarce!r}"
        ),
        "seed_combination": (
            "DeLong tests and the seed_mean metrics use each test image's score averaged over "
            "the seeds (the seed ensemble; its threshold chosen on the seed-averaged validation "
            "scores); per_seed_p_values pair seed k of the arm with seed k of the reference; "
            "aggregate = mean, sample std and Student-t CI of the per-seed test metrics."
        ),
        "comparisons": comparisons,
    }
    return arms, {"evaluation": evaluation, "scores": scores, "y_test": y_target}


def run_anomaly(config, workdir, runs, run_sub) -> dict[str, Any]:
    """Normal-only generators (dedicated) and both detectors; their test ROC-AUC with CIs."""
    for name in runs:
        if name.startswith("anomaly/"):
            run_sub(name)
    out = {}
    for method in config.anomaly.methods:
        name = f"anomaly/{method}"
        sub_workdir, sub = runs[name][1], runs[name][2]
        result = _read_json(os.path.join(sub_workdir, "results.json"))
        generator = os.path.relpath(sub.generator_workdir, workdir)
        trained_on = (
            f"the {config.anomaly.normal_class!r} images of the training split only"
            if config.anomaly.generators == "dedicated"
            else "the scarce training split (both classes; conditioned on the normal class)"
        )
        out[method] = {
            "workdir": os.path.relpath(sub_workdir, workdir),
            "generator_workdir": generator,
            "generator_trained_on": trained_on,
            "normal_class": config.anomaly.normal_class,
            "test": headline(result["test"]),
            "val": headline(result["val"]),
            "threshold": result["threshold"],
            "threshold_split": result.get("threshold_split", config.data.val_split),
            "counts": {k: v for k, v in result["dataset"].items() if k.endswith("_counts")},
            "wall_time_s": result.get("wall_time_s"),
        }
    return out


# ----------------------------------------------------------------------------- figures
def _metric_series(path: str, key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                if key in row and row[key] is not None and math.isfinite(row[key]):
                    steps.append(row["step"])
                    values.append(row[key])
    return steps, values


def make_figures(config, workdir, runs, quality, anomaly, extras) -> dict[str, str]:
    """figures/*.png (relative paths by name): ROC per arm, curves, quality and anomaly grids."""
    figures_dir = os.path.join(workdir, "figures")
    os.makedirs(figures_dir, exist_ok=True)
    figures: dict[str, str] = {}

    def rel(path) -> str:
        return os.path.relpath(str(path), workdir)

    y = extras["y_test"]
    curves = {ARM_LABELS[arm]: (y, s["seed_mean"]) for arm, s in extras["scores"].items()}
    figures["roc_arms"] = rel(
        report.save_roc_curves(
            curves,
            os.path.join(figures_dir, "roc_arms.png"),
            title="Test ROC per arm (seed-averaged scores; "
            f"{extras['evaluation']['delong_target']})",
        )
    )
    for key, title in (("train/loss", "classifier training loss"), ("val/auc", "validation AUC")):
        series = {}
        for arm in config.arms:
            steps, values = _metric_series(
                os.path.join(runs[f"arms/{arm}/seed0"][1], "metrics.jsonl"), key
            )
            if steps:
                series[ARM_LABELS[arm]] = (steps, values)
        if series:
            name = "curves_classifier_" + key.split("/")[1]
            figures[name] = rel(
                report.save_line_plot(
                    series, os.path.join(figures_dir, f"{name}.png"), title=f"{title}, seed 0"
                )
            )
    generator_keys = {"pggan": ("train/d/d_loss", "train/g/g_loss"), "ddpm": ("train/loss",)}
    for name, (kind, sub_workdir, _) in runs.items():
        if kind not in GENERATORS:
            continue
        series = {}
        for key in generator_keys[kind]:
            steps, values = _metric_series(os.path.join(sub_workdir, "metrics.jsonl"), key)
            if steps:
                series[key] = (steps, values)
        if series:
            label = "curves_" + name.replace("/", "_")
            figures[label] = rel(
                report.save_line_plot(
                    series, os.path.join(figures_dir, f"{label}.png"), title=f"{name} training"
                )
            )
    for kind in quality:
        folder = os.path.join(workdir, "quality", kind)
        for file in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if file.endswith(".png"):
                target = os.path.join(figures_dir, f"{kind}_{file}")
                shutil.copyfile(os.path.join(folder, file), target)
                figures[f"{kind}_{file[:-4]}"] = rel(target)
    for method, entry in anomaly.items():
        for file in ("roc.png", "residuals.png"):
            source = os.path.join(workdir, entry["workdir"], file)
            if os.path.exists(source):
                target = os.path.join(figures_dir, f"anomaly_{method}_{file}")
                shutil.copyfile(source, target)
                figures[f"anomaly_{method}_{file[:-4]}"] = rel(target)
    return figures


# ----------------------------------------------------------------------------- report
def _cell(block: Mapping[str, Any] | None, key: str) -> str:
    if not block:
        return report.MISSING
    value = block.get(key)
    if isinstance(value, Mapping):  # an aggregate_seeds entry: mean ± std [t CI]
        return report.format_value(value, ci=value.get("ci"))
    return report.format_value(value, ci=block.get(f"{key}_ci"))


def _metric_table(rows: Sequence[tuple[str, Mapping[str, Any] | None]]) -> str:
    table = [{"arm": label, **{k: _cell(block, k) for k in METRICS}} for label, block in rows]
    return report.markdown_table(table, ["arm", *METRICS])


def _p(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _p_text(value: float) -> str:
    return f"p {_p(value)}" if value < 0.001 else f"p = {_p(value)}"


def summary_sentences(results: Mapping[str, Any]) -> list[str]:
    """Plain statements: did synthetic data help, by how much, with what confidence."""
    level = int(round(100 * results["config"]["eval"]["confidence"]))
    alpha = results["config"]["eval"]["alpha"]
    lines = []
    for comparison in results["evaluation"]["comparisons"]:
        arm, ref = comparison["arm"], comparison["reference"]
        if arm not in GENERATORS:
            continue
        diff, ci = comparison["auc_difference"], comparison["ci"]
        words = {
            "higher AUC": "helped",
            "lower AUC": "hurt",
            "no detectable difference": "made no detectable difference",
        }[comparison["verdict"]]
        seed_part = ""
        paired = comparison.get("per_seed_auc_difference")
        if paired and paired.get("ci"):
            seed_part = (
                f"; per seed the difference was {paired['mean']:+.3f} on average "
                f"({level} % t-interval over {paired['n']} seeds "
                f"[{paired['ci'][0]:+.3f}, {paired['ci'][1]:+.3f}])"
            )
        lines.append(
            f"- **{ARM_LABELS[arm]} vs {ARM_LABELS[ref]}: {words}.** Test ROC-AUC difference "
            f"{diff:+.3f} ({level} % CI [{ci[0]:+.3f}, {ci[1]:+.3f}], DeLong "
            f"{_p_text(comparison['p_value'])} on seed-averaged scores, alpha = {alpha:g})"
            f"{seed_part}."
        )
    return lines


def markdown(results: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    cfg = results["config"]
    info = results["dataset"]
    scarce = cfg["scarcity"]["class_name"]
    level = int(round(100 * cfg["eval"]["confidence"]))
    arms = results["arms"]
    lines = [
        f"# Experiment report: {info['name']} ({results['preset']})",
        "",
        f"Scarcity: {cfg['scarcity']['fraction']:g} of the {scarce!r} training images kept "
        f"({info['scarce_train']['per_class'][scarce]} of {info['class_counts']['train'][scarce]}"
        f"; seed {cfg['scarcity']['seed']}); scarce training split "
        f"{info['scarce_train']['records']} images. Splits: train "
        f"{info['split_sizes']['train']}, val {info['split_sizes']['val']}, test "
        f"{info['split_sizes']['test']} at {info['resolution']} px. "
        f"{cfg['seeds']} seeds per arm. Wall time {_duration(results['wall_time_s']['total'])} "
        f"in the invocation that finished the run ({results['device']['device_kind']}, "
        f"{results['device']['device_count']} device(s)).",
        "",
        "## Did synthetic data help?",
        "",
        *(summary_sentences(results) or ["- No synthetic arm was run."]),
        "",
        "A difference counts as a help or a hurt only when DeLong's test rejects equal AUCs at "
        f"alpha = {cfg['eval']['alpha']:g}; otherwise this run cannot tell. "
        + results["evaluation"]["seed_combination"],
        "",
        f"## Test metrics per arm (mean ± std over seeds [{level} % t-interval])",
        "",
        _metric_table([(a["label"], a["aggregate"]) for a in arms.values()]),
        f"## Test metrics of the seed-averaged scores ({level} % bootstrap CIs over test images)",
        "",
        _metric_table([(a["label"], a["seed_mean"]) for a in arms.values()]),
        f"Metrics: {results['evaluation']['headline']}. Thresholds were chosen on "
        f"validation ({cfg['classifier']['eval']['threshold']}); checkpoints by validation AUC.",
        "",
        "## DeLong tests (test ROC-AUC, seed-averaged scores)",
        "",
    ]
    rows = []
    for c in results["evaluation"]["comparisons"]:
        rows.append(
            {
                "arm": ARM_LABELS[c["arm"]],
                "vs": ARM_LABELS[c["reference"]],
                "AUC difference": report.format_value(c["auc_difference"], "+.3f", c["ci"]),
                "p": _p(c["p_value"]),
                "per-seed p": ", ".join(_p(p) for p in c["per_seed_p_values"]),
                "verdict": c["verdict"],
            }
        )
    lines += [
        report.markdown_table(rows, ["arm", "vs", "AUC difference", "p", "per-seed p", "verdict"])
        if rows
        else "(no reference arm ran)\n",
    ]
    if results["quality"]:
        lines += ["## Synthetic-image quality", ""]
        qrows = []
        for kind, metrics in results["quality"].items():
            block = metrics.get("per_class", {}).get(scarce, {})
            qrows.append(
                {
                    "generator": kind,
                    "images": results["synthetic"][kind]["count"],
                    **{k: block.get(k) for k in ("fid", "kid", "precision", "recall", "density",
                                                  "coverage")},
                    "memorisation": metrics.get("memorisation_rate"),
                }
            )  # fmt: skip
        lines += [
            report.markdown_table(
                qrows,
                [
                    "generator",
                    "images",
                    "fid",
                    "kid",
                    "precision",
                    "recall",
                    "density",
                    "coverage",
                    "memorisation",
                ],
                float_fmt=".4g",
            ),  # fmt: skip
            f"Scarce class {scarce!r}, synthetic vs real {cfg['quality']['real_split']} images, "
            f"`{cfg['quality']['extractor']}` features (FID/KID lower, precision/recall/density/"
            "coverage higher is closer to real); memorisation: share of synthetic images closer "
            "to a training image than the 1 % quantile of training nearest-neighbour distances. "
            "Full reports: "
            + ", ".join(f"`quality/{k}/report.md`" for k in results["quality"])
            + ".",
            "",
        ]
    if results["anomaly"]:
        lines += ["## Anomaly detection (normal vs abnormal, test split)", ""]
        arows = [
            {
                "method": method,
                "generator trained on": entry["generator_trained_on"],
                **{k: _cell(entry["test"], k) for k in ("auc", "recall", "specificity", "f1")},
            }
            for method, entry in results["anomaly"].items()
        ]
        lines += [
            report.markdown_table(
                arows, ["method", "generator trained on", "auc", "recall", "specificity", "f1"]
            ),
            f"{level} % bootstrap CIs over test images; thresholds on validation.",
            "",
        ]
    lines += ["## Figures", ""]
    for name, path in figures.items():
        caption = figure_caption(name)
        lines += [f"**{caption}** (`{path}`)", "", f"![{caption}]({path})", ""]
    lines += [
        "## Where each number comes from",
        "",
        f"- Training: generators and classifiers read the {cfg['data']['train_split']!r} split "
        "(scarce subset except arm (e)) and synthetic folders only.",
        f"- Checkpoint selection and thresholds: the {cfg['data']['val_split']!r} split.",
        f"- Reported metrics: the {cfg['data']['test_split']!r} split, read once per run.",
        f"- Synthetic quality: real {cfg['quality']['real_split']!r} images.",
        "",
        "Stage wall times (the invocation that finished the run): "
        + ", ".join(f"{k} {_duration(v)}" for k, v in results["wall_time_s"].items())
        + ". Software: "
        + ", ".join(f"{k} {v}" for k, v in results["software"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def figure_caption(name: str) -> str:
    """A reader's caption for a figure name from `make_figures`."""
    fixed = {
        "roc_arms": "Test ROC curves per arm (seed-averaged scores)",
        "curves_classifier_loss": "Classifier training loss per arm (seed 0)",
        "curves_classifier_auc": "Validation AUC per arm (seed 0)",
        "curves_pggan": "PGGAN training losses (scarce split)",
        "curves_ddpm": "DDPM training loss (scarce split)",
        "curves_anomaly_pggan_normal": "Normal-only PGGAN training losses (for f-AnoGAN)",
        "curves_anomaly_ddpm_normal": "Normal-only DDPM training loss (for anomaly detection)",
    }
    if name in fixed:
        return fixed[name]
    head, _, rest = name.partition("_")
    kind = {"pggan": "PGGAN", "ddpm": "DDPM"}.get(head)
    if kind and rest.startswith("samples_"):
        label = rest.removeprefix("samples_")
        return f"{kind}: real {label} images (top row) vs synthetic (bottom row)"
    if kind and rest.startswith("embedding_"):
        method = rest.removeprefix("embedding_").upper()
        return f"{kind}: real vs synthetic features ({method})"
    if kind and rest == "nearest_pairs":
        return f"{kind} memorisation check: closest synthetic (left) / training (right) pairs"
    if head == "anomaly":
        method, _, figure = rest.rpartition("_")
        what = {"roc": "ROC (val, test)", "residuals": "input / reconstruction / residual"}
        return f"Anomaly detection, {method}: {what.get(figure, figure)}"
    return name.replace("_", " ")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


# ----------------------------------------------------------------------------- checks
# results.json: required keys and their types (nested dicts list their own required keys).
SCHEMA: dict[str, Any] = {
    "finished": bool,
    "preset": str,
    "config": dict,
    "dataset": {
        "name": str,
        "class_names": list,
        "label_kind": str,
        "split_sizes": {"train": int, "val": int, "test": int},
        "class_counts": dict,
        "scarce_train": {"records": int, "per_class": dict},
    },
    "generators": dict,
    "synthetic": dict,
    "quality": dict,
    "arms": dict,
    "evaluation": {
        "test_images": int,
        "delong_target": str,
        "headline": str,
        "seed_combination": str,
        "comparisons": list,
    },
    "anomaly": dict,
    "split_use": {
        "test_split": str,
        "val_split": str,
        "training": dict,
        "threshold": dict,
        "checkpoint_selection": dict,
        "quality_real": str,
    },
    "wall_time_s": {stage: (int, float) for stage in (*STAGES, "total")},
    "sub_run_wall_time_s": dict,
    "software": dict,
    "device": {"platform": str, "device_kind": str, "device_count": int},
}
ARM_SCHEMA = {"label": str, "per_seed": list, "aggregate": dict, "seed_mean": dict, "delong": dict}


def _schema_problems(value, schema, path: str) -> list[str]:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        problems = []
        for key, sub in schema.items():
            if key not in value:
                problems.append(f"{path}.{key}: missing")
            else:
                problems += _schema_problems(value[key], sub, f"{path}.{key}")
        return problems
    if not isinstance(value, schema) or (schema is int and isinstance(value, bool)):
        return [f"{path}: expected {schema}, got {type(value).__name__}"]
    return []


def _ci_problems(block: Mapping[str, Any], path: str, tol: float = 1e-9) -> list[str]:
    problems = []
    for key, value in block.items():
        if isinstance(value, Mapping) and "mean" in value:  # aggregate_seeds entry
            ci = value.get("ci")
            if ci is not None and not ci[0] - tol <= value["mean"] <= ci[1] + tol:
                problems.append(f"{path}.{key}: mean {value['mean']} outside {ci}")
        elif key.endswith("_ci") and value is not None:
            point = block.get(key[:-3])
            if point is not None and not value[0] - tol <= point <= value[1] + tol:
                problems.append(f"{path}.{key[:-3]}: {point} outside its CI {value}")
    return problems


def check_results(results: Mapping[str, Any]) -> list[str]:
    """Problems with a results.json (empty = fine): the schema and the invariants.

    Invariants: every configured arm is present with every seed; every CI contains its point
    estimate; no sub-run trained on the test split; every threshold and checkpoint choice
    came from the validation split; quality was measured against non-test images.
    """
    problems = _schema_problems(results, SCHEMA, "results")
    if problems:
        return problems
    config = results["config"]
    seeds = int(config["seeds"])
    for arm in config["arms"]:
        if arm not in results["arms"]:
            problems.append(f"arm {arm!r} missing")
            continue
        entry = results["arms"][arm]
        problems += _schema_problems(entry, ARM_SCHEMA, f"arms.{arm}")
        if len(entry.get("per_seed", ())) != seeds:
            problems.append(f"arms.{arm}: {len(entry.get('per_seed', ()))} seeds, want {seeds}")
        for row in entry.get("per_seed", ()):
            problems += _ci_problems(row["test"], f"arms.{arm}.seed{row['seed']}.test")
        problems += _ci_problems(entry.get("seed_mean", {}), f"arms.{arm}.seed_mean")
        problems += _ci_problems(entry.get("aggregate", {}), f"arms.{arm}.aggregate")
        for row in entry.get("per_seed", ()):
            if any(m not in row["test"] for m in METRICS):
                problems.append(f"arms.{arm}.seed{row['seed']}: metrics missing")
    use = results["split_use"]
    test, val = use["test_split"], use["val_split"]
    for name, splits in use["training"].items():
        if test in splits:
            problems.append(f"{name} trained on the test split {test!r}")
    for kind in ("threshold", "checkpoint_selection"):
        for name, split in use[kind].items():
            if split not in (val, None) or (kind == "threshold" and split is None):
                problems.append(f"{name}: {kind} from split {split!r}, not validation {val!r}")
    if use["quality_real"] == test:
        problems.append("synthetic quality measured against the test split")
    for comparison in results["evaluation"]["comparisons"]:
        if not 0.0 <= comparison["p_value"] <= 1.0:
            problems.append(f"p-value {comparison['p_value']} out of [0, 1]")
    for method, entry in results["anomaly"].items():
        problems += _ci_problems(entry["test"], f"anomaly.{method}.test")
    return problems


# ----------------------------------------------------------------------------- driver
def run(config, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the whole experiment in `workdir`; returns the results dict.

    A finished workdir returns its saved results.json. Raises `Preempted` when SIGTERM /
    SIGINT stopped it (everything finished so far is kept), ConfigError for a bad config
    (before any work).
    """
    start = time.perf_counter()
    workdir = os.path.abspath(os.path.expanduser(workdir))
    validate(config, workdir)
    saved = _read_json(os.path.join(workdir, "results.json"))
    if saved is not None:
        logging.info("%s/results.json exists: the experiment is finished", workdir)
        return saved
    runs = plan(config, workdir)
    if parallel.is_main_process():
        config_lib.save_json(config, os.path.join(workdir, "config.json"))
    timings: dict[str, float] = {}
    sub_results: dict[str, Mapping[str, Any]] = {}
    with _StopFlag() as stop:

        def run_sub(name: str) -> Mapping[str, Any]:
            kind, sub_workdir, sub = runs[name]
            stage = 2 if kind == "classifier" else (3 if name.startswith("anomaly/") else 1)
            done = os.path.exists(os.path.join(sub_workdir, "results.json"))
            _log(stage, "%s %s (%s) -> %s", "skip (finished)" if done else "run", name, kind,
                 sub_workdir)  # fmt: skip
            result = _driver(kind).train_and_evaluate(sub, sub_workdir)
            sub_results[name] = _finished(result, name, stop)
            return result

        # Stage 1: data, generators on the scarce split, synthesis, quality.
        t0 = time.perf_counter()
        data = prepare_data(config, workdir, stop)
        generators = needed_generators(config)
        for kind in generators:
            run_sub(kind)
        synthetic = synthesize_all(config, workdir, data, generators, stop) if generators else {}
        quality = (
            evaluate_quality(config, workdir, data, synthetic, stop)
            if config.quality.enabled and synthetic
            else {}
        )
        timings[STAGES[0]] = results_lib.elapsed(t0)

        # Stage 2: the classifier arms, every seed.
        t0 = time.perf_counter()
        names = [n for n, (kind, _, _) in runs.items() if kind == "classifier"]
        for number, name in enumerate(names, start=1):
            _log(2, "classifier %d of %d", number, len(names))
            run_sub(name)
        timings[STAGES[1]] = results_lib.elapsed(t0)

        # Stage 3: test-split evaluation, anomaly detection, report.
        t0 = time.perf_counter()
        info = data["info"]
        arms, extras = evaluate_arms(config, workdir, info, runs)
        anomaly = run_anomaly(config, workdir, runs, run_sub) if config.anomaly.enabled else {}
        timings[STAGES[2]] = results_lib.elapsed(t0)
    timings["total"] = results_lib.elapsed(start)
    evaluation = extras["evaluation"]
    evaluation["headline"] = (
        f"binary task, precision / recall / F1 of the positive class {info['class_names'][1]!r}"
        if info["label_kind"] == sources.MULTICLASS and len(info["class_names"]) == 2
        else "macro averages over classes (the scarce class's own metrics per seed in "
        "results.json: test_scarce_class)"
    )
    split_use = {
        "test_split": config.data.test_split,
        "val_split": config.data.val_split,
        "training": {},
        "threshold": {},
        "checkpoint_selection": {},
        "quality_real": config.quality.real_split,
    }
    for name, (kind, sub_workdir, sub) in runs.items():
        result = sub_results.get(name) or _read_json(os.path.join(sub_workdir, "results.json"))
        if kind == "classifier":
            used = result["splits_used"]
            split_use["training"][name] = used["training"]
            split_use["threshold"][name] = used["threshold"]
            split_use["checkpoint_selection"][name] = used["checkpoint_selection"]
        elif kind == "anomaly":
            split_use["training"][name] = training_splits(kind, sub)
            split_use["threshold"][name] = result.get("threshold_split")
        else:
            split_use["training"][name] = training_splits(kind, sub)
    generators_info = {}
    for name, (kind, sub_workdir, _) in runs.items():
        if kind in GENERATORS:
            result = sub_results[name]
            generators_info[name] = {
                "workdir": os.path.relpath(sub_workdir, workdir),
                "train_records": result.get("train_records", result.get("dataset", {}).get(
                    "train_records")),
                "steps": result.get("step", result.get("final_step")),
                "final_loss": result.get("final_loss"),
                "wall_time_s": result.get("wall_time_s"),
            }  # fmt: skip
    results: dict[str, Any] = {
        "finished": True,
        "preset": str(config.get("preset", "")),
        "config": config_lib.to_dict(config),
        "dataset": info,
        "generators": generators_info,
        "synthetic": {
            kind: {k: v for k, v in entry.items() if k != "provenance"}
            | {"folder": os.path.relpath(entry["folder"], workdir)}
            for kind, entry in synthetic.items()
        },
        "quality": {kind: _quality_summary(metrics) for kind, metrics in quality.items()},
        "arms": arms,
        "evaluation": evaluation,
        "anomaly": anomaly,
        "split_use": split_use,
        "wall_time_s": timings,
        "sub_run_wall_time_s": {
            name: result.get("wall_time_s") for name, result in sub_results.items()
        },
        "software": results_lib.software_versions(),
        "device": results_lib.device_description(),
    }
    results = json.loads(json.dumps(results, default=results_lib._json_default))
    problems = check_results(results)
    if problems:
        raise AssertionError("experiment results fail their invariants: " + "; ".join(problems))
    if parallel.is_main_process():
        figures = make_figures(config, workdir, runs, quality, anomaly, extras)
        results["figures"] = figures
        with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
            f.write(markdown(results, figures))
        results_lib.save_results(os.path.join(workdir, "results.json"), results)
    logging.info("[experiment] finished in %s: %s/report.md", _duration(timings["total"]), workdir)
    return results


def _quality_summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    keys = (*("fid", "kid", "kid_std_err", "precision", "recall", "density", "coverage"),
            "silhouette", "davies_bouldin", "calinski_harabasz", "memorisation_rate",
            "kmeans_ari", "kmeans_nmi")  # fmt: skip
    out = {key: metrics.get(key) for key in keys}
    out["per_class"] = metrics.get("per_class", {})
    out["sizes"] = metrics.get("sizes")
    out["extractor"] = metrics.get("extractor")
    out["real_split"] = metrics.get("real_split")
    out["warnings"] = metrics.get("warnings", [])
    out["report"] = f"quality/{metrics.get('generator')}/report.md"
    return out
