"""results.json's schema and invariants (`check_results`), checked at the end of every run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cxrjax.data import builders
from cxrjax.experiment import design

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
    "classifier_model": {"name": str, "parameters": int},
    "generators": dict,
    "synthetic": dict,
    "quality": dict,
    "cas": dict,
    "metric_vs_utility": dict,
    "arms": dict,
    "evaluation": {
        "test_images": int,
        "target": str,
        "headline": str,
        "primary_test": str,
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
    "wall_time_s": {stage: (int, float) for stage in (*design.STAGES, "total")},
    "sub_run_wall_time_s": dict,
    "profile": {"stages": dict, "sub_runs": dict, "compile_cache": dict, "scope": str},
    "software": dict,
    "device": {"platform": str, "device_kind": str, "device_count": int},
    "warnings": list,
}
ARM_SCHEMA = {"label": str, "per_seed": list, "aggregate": dict, "seed_mean": dict}
COMPARISON_SCHEMA = {
    "arm": str,
    "reference": str,
    "per_seed_differences": list,
    "paired_t": dict,
    "hierarchical_bootstrap": dict,
    "verdict": str,
}


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

    Invariants: every configured arm is present with every seed, at the same optimizer steps
    and batch; the oversampled control and every synthetic arm train on the same class prior;
    every CI contains its point estimate; no sub-run trained on the test split; every
    threshold and checkpoint choice came from the validation split; quality was measured
    against non-test images; p-values are in [0, 1] and Holm never lowers one.
    """
    problems = _schema_problems(results, SCHEMA, "results")
    if problems:
        return problems
    config = results["config"]
    seeds = int(config["seeds"])
    budgets = set()
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
            if any(m not in row["test"] for m in design.METRICS):
                problems.append(f"arms.{arm}.seed{row['seed']}: metrics missing")
            budgets.add((row.get("num_steps"), row.get("global_batch_size")))
        problems += _ci_problems(entry.get("seed_mean", {}), f"arms.{arm}.seed_mean")
        problems += _ci_problems(entry.get("aggregate", {}), f"arms.{arm}.aggregate")
    if len(budgets) > 1:
        problems.append(f"arms train at different (steps, batch): {sorted(budgets)}")
    priors = {
        arm: tuple(sorted(results["arms"][arm]["per_seed"][0]["class_prior"].items()))
        for arm in config["arms"]
        if arm in results["arms"] and (arm == design.CONTROL or design.arm_generator(arm))
    }
    shortfall = any(
        (s.get("filter") or {}).get("shortfall") for s in results["synthetic"]["sets"].values()
    )
    if len(set(priors.values())) > 1 and not shortfall:
        problems.append(f"the control and synthetic arms differ in class prior: {priors}")
    use = results["split_use"]
    canon = builders.canonical_split  # "val" / "valid" / "validation" are one split
    test, val = canon(use["test_split"]), canon(use["val_split"])
    for name, splits in use["training"].items():
        if test in map(canon, splits):
            problems.append(f"{name} trained on the test split {test!r}")
        if (name == "judge" or name.startswith("cas/")) and val in map(canon, splits):
            problems.append(f"{name} trained on the validation split {val!r}")
    for kind in ("threshold", "checkpoint_selection"):
        for name, split in use[kind].items():
            if (split is not None and canon(split) != val) or (kind == "threshold" and not split):
                problems.append(f"{name}: {kind} from split {split!r}, not validation {val!r}")
    if canon(use["quality_real"]) == test:
        problems.append("synthetic quality measured against the test split")
    for c in results["evaluation"]["comparisons"]:
        problems += _schema_problems(c, COMPARISON_SCHEMA, f"comparison {c.get('arm')}")
        for key in ("primary_p_value", "p_holm"):
            p = c.get(key)
            if p is not None and not 0.0 <= p <= 1.0:
                problems.append(f"{c['arm']} vs {c['reference']}: {key} {p} out of [0, 1]")
        if c.get("p_holm") is not None and c.get("primary_p_value") is not None:
            if c["p_holm"] < c["primary_p_value"] - 1e-12:
                problems.append(f"{c['arm']}: Holm lowered a p-value")
    for method, entry in results["anomaly"].items():
        problems += _ci_problems(entry["test"], f"anomaly.{method}.test")
    return problems
