"""Stage 4: test metrics per arm, seed-level comparisons, headroom, anomaly detection.

The primary test of every comparison works at the level of seeds (seed k of an arm and of
its reference share the data order and initialisation): a paired t interval on the per-seed
test ROC-AUC differences, with a hierarchical bootstrap over seeds and test images beside it,
Holm-corrected over the comparisons of the run (`cxrjax.metrics.significance`). DeLong per seed
and on the seed-averaged scores stay as secondary figures.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from cxrjax.data import sources
from cxrjax.experiment import design, stages
from cxrjax.metrics import classification as cls_metrics
from cxrjax.metrics import significance


def headline(result: Mapping[str, Any]) -> dict[str, Any]:
    """The report's metrics (with `_ci`): binary -> positive class, else the macro average."""
    source = result if "auc" in result else result.get("macro", {})
    out = {}
    for key in design.METRICS:
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
    return {k: v for k, v in block.items() if k.removesuffix("_ci") in design.METRICS}


def target_scores(labels, probs, info, scarce: str) -> tuple[np.ndarray, np.ndarray]:
    """(y, score) of the AUC compared across arms: binary -> the positive class; multi-class
    and multi-label -> one-vs-rest of the scarce class."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    names = info["class_names"]
    if info["label_kind"] == sources.MULTICLASS and len(names) == 2:
        return labels.astype(np.int64), probs[:, 1]
    index = names.index(scarce)
    if labels.ndim == 2:
        return (labels[:, index] > 0.5).astype(np.int64), probs[:, index]
    return (labels == index).astype(np.int64), probs[:, index]


def target_description(info: Mapping[str, Any], scarce: str) -> str:
    if info["label_kind"] == sources.MULTICLASS and len(info["class_names"]) == 2:
        return f"positive class {info['class_names'][1]!r}"
    return f"one-vs-rest {scarce!r}"


def predictions(workdir: str, split: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(workdir, f"{split}_predictions.npz")) as f:
        return {key: f[key] for key in f.files}


def arm_results(config, workdir, info, runs) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per arm: per-seed test metrics, their aggregate, seed-averaged scores; and the target
    scores [seeds, N] per arm and split for the comparisons."""
    level = float(config.eval.confidence)
    scarce = config.scarcity.class_name
    arms: dict[str, Any] = {}
    scores: dict[str, dict[str, np.ndarray]] = {}
    y = {}
    for arm in config.arms:
        per_seed, probs = [], {"test": [], "val": []}
        for seed in range(int(config.seeds)):
            sub_workdir = runs[f"arms/{arm}/seed{seed}"][1]
            result = stages.read_json(os.path.join(sub_workdir, "results.json"))
            for split in ("test", "val"):
                pred = predictions(sub_workdir, split)
                if split not in y:
                    y[split] = pred["labels"]
                # Every run predicts the same images in the same (record) order.
                assert np.array_equal(pred["labels"], y[split]), f"{arm} {split} order differs"
                probs[split].append(pred["probs"])
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
                "num_steps": int(runs[f"arms/{arm}/seed{seed}"][2].train.num_steps),
                "global_batch_size": int(runs[f"arms/{arm}/seed{seed}"][2].train.global_batch_size),
                "train_records": result["train_records"],
                "training_data": result["training_data"]["parts"],
                "class_prior": _class_prior(result["training_data"]["parts"], info),
                "calibration": result.get("calibration"),
                "wall_time_s": result.get("wall_time_s"),
            }
            block = scarce_class_metrics(result["test"], scarce)
            if block is not None:
                entry["test_scarce_class"] = block
            per_seed.append(entry)
        mean_test, mean_val = np.mean(probs["test"], axis=0), np.mean(probs["val"], axis=0)
        names = info["class_names"]
        threshold = cls_metrics.select_threshold(
            y["val"], mean_val, config.classifier.eval.threshold, class_names=names
        )
        seed_mean = cls_metrics.evaluate(
            y["test"],
            mean_test,
            threshold=threshold,
            class_names=names,
            n_bootstrap=int(config.eval.bootstrap),
            seed=0,
            level=level,
        )
        target_y, target = target_scores(y["test"], mean_test, info, scarce)
        scores[arm] = {
            split: np.stack([target_scores(y[split], p, info, scarce)[1] for p in probs[split]])
            for split in ("test", "val")
        }
        arms[arm] = {
            "label": design.ARM_LABELS[arm],
            "per_seed": per_seed,
            "aggregate": cls_metrics.aggregate_seeds([e["test"] for e in per_seed], level),
            "seed_mean": {
                **headline(seed_mean),
                "threshold": threshold,
                "threshold_split": config.data.val_split,
            },
            "delong_auc_ci": cls_metrics.delong_auc_ci(target_y, target, level),
        }
    targets = {split: target_scores(y[split], probs_dummy(y[split], info), info, scarce)[0]
               for split in ("test", "val")}  # fmt: skip
    return arms, {"scores": scores, "y": targets}


def probs_dummy(labels, info) -> np.ndarray:
    """A zero score array of the right shape, to get target labels from `target_scores`."""
    labels = np.asarray(labels)
    k = labels.shape[1] if labels.ndim == 2 else len(info["class_names"])
    return np.zeros((len(labels), k))


def _class_prior(parts, info) -> dict[str, int]:
    """Training records per class, summed over the parts (real, repeats, synthetic)."""
    totals = {name: 0 for name in info["class_names"]}
    for part in parts:
        for name, count in part.get("per_class", {}).items():
            if name in totals:
                totals[name] += int(count)
    return totals


def _seed_aucs(arms, arm, split="test") -> list[float]:
    key = "test" if split == "test" else "val"
    return [row[key]["auc"] for row in arms[arm]["per_seed"]]


def compare(config, arms, extras, arm: str, reference: str, split: str = "test"):
    scores, y = extras["scores"], extras["y"][split]
    return significance.comparison(
        y,
        scores[arm][split],
        scores[reference][split],
        _seed_aucs(arms, arm, split),
        _seed_aucs(arms, reference, split),
        level=float(config.eval.confidence),
        n_resamples=int(config.eval.hierarchical_bootstrap),
        seed=0,
    )


def val_difference(config, arms, arm: str, reference: str) -> dict[str, Any] | None:
    """The same paired per-seed AUC difference on validation, shown beside test's: the split
    that chose checkpoints and thresholds (so optimistic), and, where its sign disagrees with
    test's, a sign that validation does not stand for test (a shifted test set, or a gain that
    only holds on the training distribution)."""
    rows = [row for name in (arm, reference) for row in arms[name]["per_seed"]]
    if not all((row.get("val") or {}).get("auc") is not None for row in rows):
        return None
    differences = np.subtract(_seed_aucs(arms, arm, "val"), _seed_aucs(arms, reference, "val"))
    return significance.paired_t(differences, float(config.eval.confidence))


def comparisons(config, arms, extras) -> list[dict[str, Any]]:
    """Every planned (arm, reference) comparison on test, Holm-corrected together."""
    out = []
    for arm, reference in design.comparisons(config):
        block = compare(config, arms, extras, arm, reference)
        block.update(
            arm=arm,
            reference=reference,
            primary=bool(design.arm_generator(arm)) and reference == design.CONTROL,
            val=val_difference(config, arms, arm, reference),
        )
        out.append(block)
    significance.adjust(out, float(config.eval.alpha))
    return out


def headroom(config, arms, extras) -> dict[str, Any] | None:
    """real_full vs real_scarce on test (reported) and on validation (what presets tune on)."""
    if not {design.BASELINE, "real_full"} <= set(config.arms):
        return None
    out = {}
    for split in ("test", "val"):
        scores = extras["scores"]
        out[split] = significance.headroom(
            extras["y"][split],
            scores[design.BASELINE][split],
            scores["real_full"][split],
            _seed_aucs(arms, design.BASELINE, split),
            _seed_aucs(arms, "real_full", split),
            level=float(config.eval.confidence),
            n_resamples=int(config.eval.hierarchical_bootstrap),
            seed=0,
            min_gap=float(config.headroom.min_gap),
        )
    out["sufficient"] = bool(out["test"]["sufficient"])
    return out


def anomaly_results(config, workdir, runs) -> dict[str, Any]:
    """Both detectors' results (both score spaces where the driver computed them)."""
    out = {}
    for method in config.anomaly.methods:
        name = f"anomaly/{method}"
        sub_workdir, sub = runs[name][1], runs[name][2]
        result = stages.read_json(os.path.join(sub_workdir, "results.json"))
        generator = os.path.relpath(sub.generator_workdir, workdir)
        trained_on = (
            f"the {config.anomaly.normal_class!r} images of the training split only"
            if config.anomaly.generators == "dedicated"
            else "the scarce training split (both classes; conditioned on the normal class)"
        )
        entry = {
            "workdir": os.path.relpath(sub_workdir, workdir),
            "generator_workdir": generator,
            "generator_trained_on": trained_on,
            "normal_class": config.anomaly.normal_class,
            "score_direction": "higher = more anomalous (fixed before scoring)",
            "test": headline(result["test"]),
            "val": headline(result["val"]),
            "threshold": result["threshold"],
            "threshold_split": result.get("threshold_split", config.data.val_split),
            "counts": {k: v for k, v in result["dataset"].items() if k.endswith("_counts")},
            "warnings": list(result.get("warnings", [])),
            "wall_time_s": result.get("wall_time_s"),
        }
        spaces = result.get("scores") or {}
        if spaces:
            entry["spaces"] = {
                space: {
                    "val": headline(block.get("val", {})),
                    "test": headline(block.get("test", {})),
                }
                for space, block in spaces.items()
                if isinstance(block, Mapping) and "val" in block
            }
            entry["primary_space"] = result.get("primary_score")
        for key in ("t_star", "t_star_grid", "t_star_selection"):
            if key in result:
                entry[key] = result[key]
        out[method] = entry
    return out
