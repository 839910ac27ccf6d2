"""Synthetic-set quality and usefulness inside the experiment (stage 2).

Per generator: class fidelity of its synthetic images beside real held-out images of each class
(the judge), the gate's verdict, the cross-class FD / KID matrix, the filter's acceptance, and
the distribution / clustering report of `cxrjax.quality` in the chosen feature space (the
judge's features by default). Stage 4 adds the classification accuracy score (CAS) and the
agreement between every quality metric and each arm's measured utility.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from cxrjax import parallel
from cxrjax.experiment import design, stages
from cxrjax.metrics import utility

# Quality metrics compared with utility: (results key, higher is better).
RANKED_METRICS = {
    "class_fidelity": True,
    "detail_ratio": True,
    "fid": False,
    "kid": False,
    "precision": True,
    "recall": True,
    "density": True,
    "coverage": True,
    "cas_auc": True,
}


def extractor_for(config, judge):
    """The feature space of the quality report: the judge's features, pixels, or a spec."""
    from cxrjax import features

    spec = config.quality.extractor
    if spec == "judge":
        return judge.features
    return features.make_extractor(spec)


def real_probabilities(config, data, judge) -> dict[str, Any]:
    images, labels = stages.real_eval_set(config, data, judge.class_names)
    return {"images": images, "labels": labels, "probs": judge.probs(images)}


def evaluate(config, workdir, data, synthetic, judge, real, stop) -> dict[str, Any]:
    """Quality and class fidelity of every generator's sets (read back when already done)."""
    from cxrjax import features, quality

    out = {}
    scarce = config.scarcity.class_name
    names = judge.class_names
    intended_scarce = names[0] if judge.multilabel else scarce
    resolution = int(config.data.resolution)
    real_fidelity = utility.class_fidelity(real["probs"], real["labels"], names)
    extractor = extractor_for(config, judge)
    train_images = stages.decode(
        data["splits"]["train"], stages.cap(data["kept"], config.quality.max_images, 1), resolution
    )
    cache = os.path.join(workdir, "quality", "feature_cache")
    for kind in design.needed_generators(config):
        output_dir = os.path.join(workdir, "quality", kind)
        saved = stages.read_json(os.path.join(output_dir, "utility.json"))
        if saved is not None:
            out[kind] = saved
            continue
        stages.log(2, "quality of %s (%s features) -> %s", kind, extractor.spec, output_dir)
        sets = synthetic["sets"]
        images, labels = stages.load_folder(sets[kind], names, intended_scarce, resolution)
        for key, entry in sets.items():
            if key.startswith(f"{kind}_quality_"):
                other = key.removeprefix(f"{kind}_quality_")
                im, lab = stages.load_folder(entry, names, other, resolution)
                images, labels = np.concatenate([images, im]), np.concatenate([labels, lab])
        probs = judge.probs(images)
        synth_fidelity = utility.class_fidelity(probs, labels, names)
        gate = utility.gate(
            synth_fidelity,
            real_fidelity,
            margin=float(config.quality.fidelity_margin),
            classes=[intended_scarce],
        )
        keep = stages.cap(np.arange(len(images)), config.quality.max_images, 2)
        metrics = quality.evaluate(
            real["images"],
            real["labels"],
            images[keep],
            labels[keep],
            train_images,
            extractor,
            class_names=names,
            data_ids={
                "real": f"{data['spec'].name}:{config.quality.real_split}",
                "synthetic": f"{kind}:{sets[kind]['folder']}",
                "train": f"{data['spec'].name}:{config.data.train_split}:scarce",
            },
            cache_dir=cache,
            batch_size=int(config.quality.batch_size),
            seed=0,
            output_dir=output_dir,
            embedding=config.quality.embedding,
            extra={"generator": kind, "real_split": config.quality.real_split},
            kid_subset_size=int(config.quality.kid_subset_size),
            kid_subsets=int(config.quality.kid_subsets),
        )
        real_feats = features.extract(extractor, real["images"], cache_dir=cache)
        synth_feats = features.extract(extractor, images[keep], cache_dir=cache)
        matrix = utility.distance_matrix(
            real_feats,
            real["labels"],
            synth_feats,
            labels[keep],
            names,
            kid_subset_size=int(config.quality.kid_subset_size),
            kid_subsets=int(config.quality.kid_subsets),
        )
        filtered = sets.get(f"{kind}_filtered")
        scarce_real = real_feats[real["labels"] == names.index(intended_scarce)]
        scarce_synth = synth_feats[labels[keep] == names.index(intended_scarce)]
        real_scarce_images = real["images"][real["labels"] == names.index(intended_scarce)]
        synth_scarce_images = images[keep][labels[keep] == names.index(intended_scarce)]
        detail = utility.fine_detail(synth_scarce_images, real_scarce_images)
        variants = {kind: variant_metrics(scarce_real, scarce_synth, synth_fidelity, config)}
        variants[kind]["class_fidelity"] = synth_fidelity[intended_scarce]["assigned_fraction"]
        variants[kind]["detail_ratio"] = detail["ratio"]
        if filtered is not None:
            fimages, flabels = stages.load_folder(filtered, names, intended_scarce, resolution)
            ffeats = features.extract(extractor, fimages, cache_dir=cache)
            fprobs = judge.probs(fimages)
            ffid = utility.class_fidelity(fprobs, flabels, names)
            variants[f"{kind}_filtered"] = variant_metrics(scarce_real, ffeats, ffid, config)
            variants[f"{kind}_filtered"]["class_fidelity"] = ffid[intended_scarce][
                "assigned_fraction"
            ]
            fdetail = utility.fine_detail(fimages[flabels == names.index(intended_scarce)],
                                          real_scarce_images)  # fmt: skip
            variants[f"{kind}_filtered"]["detail_ratio"] = fdetail["ratio"]
        entry = {
            "generator": kind,
            "feature_space": describe_space(config, extractor),
            "class_fidelity": {"synthetic": synth_fidelity, "real": real_fidelity},
            "gate": gate,
            "fine_detail": detail,
            "distance_matrix": matrix,
            "nearest_real_class": utility.nearest_real_class(matrix),
            "filter": None if filtered is None else filtered["provenance"].get("filter"),
            "variants": variants,
            "metrics": summary(metrics, intended_scarce),
            "warnings": list(metrics.get("warnings", [])),
            "report": os.path.relpath(os.path.join(output_dir, "report.md"), workdir),
        }
        if parallel.is_main_process():
            from cxrjax import fileio

            fileio.write_json(os.path.join(output_dir, "utility.json"), entry)
        out[kind] = entry
        verdict = "adequate" if gate["adequate"] else "NOT adequate at this budget"
        row = gate["per_class"][intended_scarce]
        stages.log(
            2,
            "%s: synthetic %r judged %r %.1f %% (real %.1f %%): %s",
            kind,
            intended_scarce,
            intended_scarce,
            100 * (row["synthetic"] or 0),
            100 * (row["real"] or 0),
            verdict,
        )
        stop.check(f"after the quality of {kind}")
    stages.sync("quality")
    return out


def describe_space(config, extractor) -> dict[str, Any]:
    spec = config.quality.extractor
    words = {
        "judge": "the judge classifier's pooled penultimate features",
        "pixels": "raw pixels (downsampled)",
    }
    return {
        "name": spec,
        "description": words.get(spec, spec),
        "dim": int(extractor.dim),
        "extractor": extractor.describe(),
    }


def summary(metrics: Mapping[str, Any], scarce: str) -> dict[str, Any]:
    """The scarce class's distribution metrics (what the arm adds) plus set-wide figures."""
    block = metrics.get("per_class", {}).get(scarce, {})
    keys = ("fid", "kid", "precision", "recall", "density", "coverage")
    out = {key: block.get(key) for key in keys}
    out["sizes"] = block.get("sizes")
    for key in ("memorisation_rate", "kmeans_ari", "kmeans_nmi"):
        out[key] = metrics.get(key)
    out["class_structure"] = metrics.get("class_structure")
    return out


def cas(results_by_name: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """CAS: validation ROC-AUC of classifiers trained on one image folder only."""
    out = {}
    for name, result in results_by_name.items():
        val = result.get("val", {})
        auc = val.get("auc", val.get("macro", {}).get("auc"))
        out[name] = {
            "val_auc": auc,
            "train_records": result.get("train_records"),
            "training_data": result.get("training_data", {}).get("parts"),
        }
    return out


def variant_metrics(real_feats, synth_feats, fidelity, config) -> dict[str, Any]:
    """Distribution metrics of one synthetic set of the scarce class against real ones."""
    import warnings

    from cxrjax import quality
    from cxrjax.metrics import generative

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", generative.MetricWarning)
        block = quality.distribution_metrics(
            real_feats,
            synth_feats,
            k=5,
            kid_subset_size=int(config.quality.kid_subset_size),
            kid_subsets=int(config.quality.kid_subsets),
            seed=0,
            chunk_size=1024,
        )
    keys = ("fid", "kid", "precision", "recall", "density", "coverage")
    return {key: quality.to_python(block.get(key)) for key in keys} | {"n": int(len(synth_feats))}


def metric_vs_utility(
    quality_by_kind: Mapping[str, Any],
    cas_block: Mapping[str, Any],
    utility_by_arm: Mapping[str, float | None],
) -> dict[str, Any]:
    """Per synthetic arm, every quality metric of its set beside its AUC change (against the
    control), and the rank agreement of each metric with that change across the arms.

    A filtered set's class fidelity is high by construction (the judge chose it); its row says
    so, and CAS is measured on the unfiltered sets only.
    """
    rows = []
    per_metric: dict[str, dict[str, float | None]] = {m: {} for m in RANKED_METRICS}
    for arm, gain in utility_by_arm.items():
        kind = design.arm_generator(arm)
        if kind is None or kind not in quality_by_kind:
            continue
        values = dict(quality_by_kind[kind].get("variants", {}).get(arm, {}))
        values.pop("n", None)
        values["cas_auc"] = (
            None if design.is_filtered(arm) else cas_block.get(kind, {}).get("val_auc")
        )
        rows.append({"arm": arm, "auc_change": gain, **values})
        for metric in RANKED_METRICS:
            per_metric[metric][arm] = values.get(metric)
    gains = {row["arm"]: row["auc_change"] for row in rows}
    agreement = {
        metric: utility.rank_agreement(values, gains, higher_is_better=RANKED_METRICS[metric])
        for metric, values in per_metric.items()
    }
    return {"rows": rows, "rank_agreement": agreement}
