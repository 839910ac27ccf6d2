"""The experiment's data work: the real splits, the judge, generators, synthetic sets, quality.

Every step here is resumable: a synthetic folder whose provenance matches the request is kept,
an interrupted one is started again, and quality reports are read back when present.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from cxrjax import config as config_lib
from cxrjax import fileio, parallel
from cxrjax.data import imageio, mixing, sources
from cxrjax.experiment import design
from cxrjax.train import results as results_lib

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "resources", "generators")
# Fields that may differ between a shipped generator's config and the experiment's own without
# changing what was trained (where data lives, logging and checkpoint cadence).
SHIPPED_HARMLESS = (
    "data.data_dir",
    "data.manual_dir",
    *config_lib.THROUGHPUT_FIELDS,
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.sample_every",
    "samples",
    "sample",
    "preset",
)


def log(stage: int, message: str, *args) -> None:
    logging.info(f"[experiment stage {stage}/4 {design.STAGES[stage - 1]}] {message}", *args)


def read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    return json.loads(fileio.read_text(path))


def sync(name: str) -> None:
    """All processes wait here (files written by process 0 are then visible to the others)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def class_counts(labels: np.ndarray, class_names: Sequence[str]) -> dict[str, int]:
    labels = np.asarray(labels)
    return {name: int(len(mixing.class_indices(labels, name, class_names))) for name in class_names}


def decode(source, indices: np.ndarray, resolution: int) -> np.ndarray:
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


def cap(indices: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if limit <= 0 or len(indices) <= limit:
        return np.asarray(indices)
    return np.sort(np.random.default_rng(seed).choice(indices, size=limit, replace=False))


# ----------------------------------------------------------------------------- real data
def prepare_data(config, workdir: str) -> dict[str, Any]:
    """Opens the real splits; the scarce subset and every count the report needs."""
    from cxrjax.train import classifier_run

    reference = design.classifier_config(config, "real_full", 0, "/unused")
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
        "scarce_train": {
            "records": int(len(kept)),
            "per_class": class_counts(labels["train"][kept], spec.class_names),
        },
    }
    name = config.scarcity.class_name
    log(
        1,
        "%s: train %d / val %d / test %d; the scarce split keeps %d of %d %r (%d records)",
        spec.name,
        len(splits["train"]),
        len(splits["val"]),
        len(splits["test"]),
        info["scarce_train"]["per_class"][name],
        counts["train"][name],
        name,
        len(kept),
    )
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


# ----------------------------------------------------------------------------- generators
def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, path + "."))
        else:
            out[path] = list(value) if isinstance(value, tuple) else value
    return out


def shipped_generator(kind: str, sub) -> tuple[str | None, list[str]]:
    """(path of a shipped exported generator trained with this config, or None; why not).

    A shipped generator answers only for the exact config it was trained with: every field
    but those in SHIPPED_HARMLESS must match.
    """
    reasons = []
    if not os.path.isdir(SHIPPED_DIR):
        return None, ["no generators ship with this installation"]
    wanted = _flat(config_lib.to_dict(sub))
    for name in sorted(os.listdir(SHIPPED_DIR)):
        path = os.path.join(SHIPPED_DIR, name)
        recorded = read_json(os.path.join(path, "config.json"))
        if recorded is None or not name.endswith(f"_{kind}"):
            continue
        have = _flat(recorded)
        differ = [
            f"{key}: {have.get(key)!r} -> {wanted.get(key)!r}"
            for key in sorted(set(have) | set(wanted))
            if not any(key == h or key.startswith(h + ".") for h in SHIPPED_HARMLESS)
            and have.get(key) != wanted.get(key)
            # A field added to the configs after the export, left "off", changes nothing.
            and not (key not in have and wanted.get(key) in (None, "", 0, False, [], {}))
        ]
        if not differ:
            return path, []
        reasons.append(f"{name} differs in {len(differ)} field(s): " + "; ".join(differ[:4]))
    return None, reasons or [f"no shipped {kind} generator"]


def install_shipped(kind: str, sub, sub_workdir: str) -> dict[str, Any]:
    """Copies the shipped generator that matches `sub` into the sub-workdir (once)."""
    source, reasons = shipped_generator(kind, sub)
    if source is None:
        raise config_lib.ConfigError(
            f"generators: 'shipped' but {reasons[0]}; use --config.generators=train to train "
            f"the {kind} generator for this config"
        )
    if parallel.is_main_process() and not os.path.exists(os.path.join(sub_workdir, "results.json")):
        tmp = f"{sub_workdir}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        os.makedirs(os.path.dirname(sub_workdir), exist_ok=True)
        shutil.rmtree(sub_workdir, ignore_errors=True)
        os.replace(tmp, sub_workdir)
    sync(f"installed {kind}")
    result = read_json(os.path.join(sub_workdir, "results.json")) or {}
    result["source"] = f"shipped ({os.path.basename(source)})"
    return result


# ----------------------------------------------------------------------------- the judge
class Judge:
    """A classifier trained on the scarce real split: class probabilities and features.

    Multi-label data is judged on the scarce finding alone: columns (scarce, not scarce).
    """

    def __init__(self, workdir: str, info: Mapping[str, Any], scarce: str):
        from cxrjax import features

        result = read_json(os.path.join(workdir, "results.json"))
        step = int(result["selected_step"])
        self.workdir, self.step = workdir, step
        self.features = features.cxr_extractor(workdir, step=step)
        self._probs = features.cxr_extractor(workdir, step=step, probabilities=True)
        self.multilabel = info["label_kind"] == sources.MULTILABEL
        if self.multilabel:
            self.class_names = [scarce, f"not {scarce}"]
            self._column = list(info["class_names"]).index(scarce)
        else:
            self.class_names = list(info["class_names"])

    def probs(self, images: np.ndarray) -> np.ndarray:
        from cxrjax import features

        probs = features.extract(self._probs, images, batch_size=256)
        if self.multilabel:
            p = probs[:, self._column]
            return np.stack([p, 1.0 - p], axis=1)
        return probs


def real_eval_set(config, data, judge_class_names) -> tuple[np.ndarray, np.ndarray]:
    """Real held-out images (quality.real_split) and their labels in the judge's classes."""
    from cxrjax.data import builders

    reference = design.classifier_config(config, "real_full", 0, "/unused")
    options = {
        "data_dir": reference.data.data_dir or None,
        "manual_dir": reference.data.manual_dir or None,
        "resolution": int(config.data.resolution),
        "skip_corrupt": reference.data.skip_corrupt,
    }
    if reference.data.labels:
        options["labels"] = reference.data.labels
    source, _ = builders.load(config.data.name, config.quality.real_split, **options)
    raw = mixing.read_labels(source)
    if data["spec"].label_kind == sources.MULTICLASS:
        labels = raw.astype(np.int32)
    else:
        members = mixing.class_indices(raw, judge_class_names[0], data["spec"].class_names)
        labels = np.ones(len(raw), np.int32)
        labels[members] = 0
    index = cap(np.arange(len(source)), config.quality.max_images, 0)
    return decode(source, index, int(config.data.resolution)), labels[index]


# ----------------------------------------------------------------------------- synthesis
def _provenance_matches(
    folder: str, requested: int, seed: int, config=None
) -> dict[str, Any] | None:
    """The set's provenance when `folder` holds exactly this set (count, seed, DDIM steps)."""
    provenance = read_json(os.path.join(folder, "provenance.json"))
    if provenance is None or provenance.get("seed") != seed:
        return None
    if config is not None and provenance.get("sampler") == "ddim":
        if provenance.get("steps") != int(config.synthesis.steps):
            return None
    done = provenance.get("requested", provenance.get("num_images"))
    return provenance if done == requested else None


def _fresh(folder: str) -> None:
    if os.path.isdir(folder) and parallel.is_main_process():
        shutil.rmtree(folder)  # an interrupted synthesis: start this set again
    sync(f"rm {folder}")


def _synthesize(synthesize_fn, kind, generator_dir, folder, num_images, config, **request):
    """One `synthesis.synthesize*` call with the experiment's sampler options, then a sync."""
    s = config.synthesis
    provenance = synthesize_fn(
        kind,
        generator_dir,
        num_images=int(num_images),
        output=folder,
        batch_size=int(s.batch_size),
        sampler=s.sampler,
        steps=int(s.steps),
        guidance=None if s.guidance < 0 else float(s.guidance),
        **request,
    )
    sync(f"synthesized {folder}")
    return provenance


def synthesize_set(kind, generator_dir, folder, *, num_images, label, seed, config):
    """`synthesis.synthesize` unless `folder` already holds this exact set."""
    from cxrjax import synthesis

    done = _provenance_matches(folder, num_images, seed, config)
    if done is not None:
        return done
    _fresh(folder)
    return _synthesize(
        synthesis.synthesize,
        kind,
        generator_dir,
        folder,
        num_images,
        config,
        label=label,
        seed=int(seed),
    )


def _drawn_images(folder: str, provenance: Mapping[str, Any]) -> np.ndarray:
    """The images of a synthesized set's single class, in the order they were drawn."""
    (name,) = [n for n, c in provenance["counts"].items() if c]
    paths = sorted(glob.glob(os.path.join(folder, name, "*.png")))
    return np.stack([imageio.decode_gray(_read(p), p) for p in paths])


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def synthesize_filtered_set(
    kind, generator_dir, folder, *, num_images, judge, thresholds, config, pool_folder=None
):
    """The judge-filtered set; `pool_folder` (the unfiltered set of the same generator and
    class) is judged first, so only the replacements of rejected images are drawn anew."""
    from cxrjax import synthesis

    seed = int(config.synthesis.seed) + 100
    pool = pool_provenance = None
    if pool_folder is not None:
        pool_provenance = read_json(os.path.join(pool_folder, "provenance.json"))
    source = None
    if pool_provenance is not None:
        source = {"folder": os.path.basename(pool_folder), "seed": pool_provenance["seed"]}
    done = _provenance_matches(folder, num_images, seed, config)
    if done is not None and done["filter"].get("pool", {}).get("seed") == (source or {}).get(
        "seed"
    ):
        return done
    if source is not None:
        pool = _drawn_images(pool_folder, pool_provenance)
    _fresh(folder)
    provenance = _synthesize(
        synthesis.synthesize_filtered,
        kind,
        generator_dir,
        folder,
        num_images,
        config,
        intended=judge.class_names[0] if judge.multilabel else config.scarcity.class_name,
        judge=judge.probs,
        judge_class_names=judge.class_names,
        thresholds=thresholds,
        max_attempts=int(config.filter.max_attempts_factor * num_images),
        seed=seed,
        pool=pool,
        pool_source=source,
    )
    filt = provenance["filter"]
    log(
        2,
        "filtered %s: kept %d; the judge accepted %d of %d drawn (%.1f %%)%s",
        kind,
        filt["accepted"],
        filt.get("passed", filt["accepted"]),
        filt["attempts"],
        100 * (filt["acceptance_rate"] or 0.0),
        f"; SHORT by {filt['shortfall']} (attempt cap)" if filt["shortfall"] else "",
    )
    return provenance


def write_real_cas(config, data, folder: str, per_class: int) -> dict[str, Any]:
    """The CAS control: `per_class` real images per class from the scarce split (images the
    generators saw), written as an image folder like the synthetic CAS sets."""
    done = _provenance_matches(folder, per_class * len(data["spec"].class_names), 0)
    if done is not None:
        return done
    _fresh(folder)
    spec, labels, kept = data["spec"], data["labels"]["train"], data["kept"]
    counts = {}
    for offset, name in enumerate(spec.class_names):
        members = np.intersect1d(kept, mixing.class_indices(labels, name, spec.class_names))
        chosen = cap(members, per_class, 10 + offset)
        images = decode(data["splits"]["train"], chosen, int(config.data.resolution))
        if parallel.is_main_process():
            for index, image in zip(chosen, images, strict=True):
                path = os.path.join(folder, name, f"real_{int(index):07d}.png")
                fileio.write_bytes(path, imageio.encode_png(image))
        counts[name] = int(len(chosen))
    provenance = {
        "generator": "real",
        "seed": 0,
        "class_names": list(spec.class_names),
        "counts": counts,
        "num_images": int(sum(counts.values())),
        "requested": int(per_class * len(spec.class_names)),
        "source": f"{spec.name}:{config.data.train_split} (scarce subset)",
    }
    if parallel.is_main_process():
        fileio.write_json(os.path.join(folder, "provenance.json"), provenance)
    sync(f"wrote {folder}")
    return provenance


def cas_per_class(config, info) -> int:
    scarce = info["scarce_train"]["per_class"][config.scarcity.class_name]
    return int(config.quality.cas_per_class or scarce)


def synthesize_all(config, workdir, data, judge, real_probs, stop) -> dict[str, Any]:
    """Every synthetic set: each generator's arm set (scarce class), its filtered set, its
    quality-only sets of the other classes and its CAS set; and the real CAS control."""
    from cxrjax.metrics import utility

    spec, info = data["spec"], data["info"]
    count = synthetic_count(config, info)
    scarce = config.scarcity.class_name
    thresholds = None
    if judge is not None:
        thresholds = utility.acceptance_thresholds(
            real_probs["probs"], real_probs["labels"], judge.class_names, config.filter.keep
        )
    out: dict[str, Any] = {"count": count, "thresholds": thresholds, "sets": {}}
    sets = out["sets"]
    multiclass = spec.label_kind == sources.MULTICLASS
    for kind in design.needed_generators(config):
        conditional = bool(config[kind].model.conditional)
        generator_dir = os.path.join(workdir, kind)
        start = time.perf_counter()
        folder = design.synthetic_dir(workdir, kind)
        log(2, "synthesizing %d %r images with %s -> %s", count, scarce, kind, folder)
        sets[kind] = {
            "generator": kind,
            "folder": folder,
            "provenance": synthesize_set(
                kind,
                generator_dir,
                folder,
                num_images=count,
                label=scarce if conditional else None,
                seed=config.synthesis.seed,
                config=config,
            ),
        }
        if conditional and multiclass and config.synthesis.quality_per_class:
            for offset, name in enumerate(c for c in spec.class_names if c != scarce):
                qfolder = f"{folder}_quality_{name}"
                sets[f"{kind}_quality_{name}"] = {
                    "generator": kind,
                    "folder": qfolder,
                    "provenance": synthesize_set(
                        kind,
                        generator_dir,
                        qfolder,
                        num_images=int(config.synthesis.quality_per_class),
                        label=name,
                        seed=config.synthesis.seed + 1 + offset,
                        config=config,
                    ),
                }
        if f"{kind}_filtered" in config.arms:
            ffolder = design.synthetic_dir(workdir, f"{kind}_filtered")
            sets[f"{kind}_filtered"] = {
                "generator": kind,
                "folder": ffolder,
                "provenance": synthesize_filtered_set(
                    kind,
                    generator_dir,
                    ffolder,
                    num_images=count,
                    judge=judge,
                    thresholds=thresholds,
                    config=config,
                    pool_folder=folder,
                ),
            }
        if kind in design.cas_names(config) and conditional and multiclass:
            cfolder = design.synthetic_dir(workdir, f"{kind}_cas")
            n = cas_per_class(config, info)
            done = read_json(os.path.join(cfolder, "provenance.json")) or {}
            if done.get("counts") != {name: n for name in spec.class_names}:
                _fresh(cfolder)
                # One call, image i of class i mod K: every class shares the sampler's batches
                # (per-class calls each padded a whole batch of the sampler).
                synthesize_set(
                    kind,
                    generator_dir,
                    cfolder,
                    num_images=n * len(spec.class_names),
                    label=None,
                    seed=config.synthesis.seed + 50,
                    config=config,
                )
            sets[f"{kind}_cas"] = {
                "generator": kind,
                "folder": cfolder,
                "provenance": read_json(os.path.join(cfolder, "provenance.json")),
            }
        for arm in (kind, f"{kind}_filtered"):
            if arm in config.arms and parallel.is_main_process():
                # Prepared once here (the arms then only read it), not by every process at once.
                from cxrjax.train import classifier_run

                sub = design.classifier_config(config, arm, 0, workdir)
                classifier_run.load_synthetic(sub.data, spec)
        sync(f"prepared synthetic {kind}")
        sets[kind]["wall_time_s"] = results_lib.elapsed(start)
        stop.check(f"after synthesis with {kind}")
    if "real" in design.cas_names(config) and multiclass:
        folder = design.synthetic_dir(workdir, "real_cas")
        sets["real_cas"] = {
            "generator": "real",
            "folder": folder,
            "provenance": write_real_cas(config, data, folder, cas_per_class(config, info)),
        }
    return out


def load_folder(entry, judge_class_names, intended: str | None, resolution: int):
    """uint8 images and labels (in the judge's classes) of one synthetic folder."""
    from cxrjax import quality

    image_set = quality.load_image_folder(entry["folder"], resolution=resolution)
    names = image_set.class_names
    if intended is not None:
        labels = np.full(len(image_set.labels), judge_class_names.index(intended), np.int32)
    else:
        lookup = np.array([list(judge_class_names).index(n) for n in names])
        labels = lookup[image_set.labels]
    return image_set.images, labels
