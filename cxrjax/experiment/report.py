"""The experiment's report: warnings, verdict sentences, tables and figures, all read from
results.json and the config (no figure or setting is fixed text)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cxrjax import report
from cxrjax.experiment import design

MIN_TEST_PER_CLASS = 100  # below this per class, test CIs are wide: a warning
MIN_SEEDS = 5
UTILITY_KEYS = ("class_fidelity", "detail_ratio", "fid", "kid", "precision", "recall")
UTILITY_KEYS = (*UTILITY_KEYS, "density", "coverage", "cas_auc")
TESTS = {
    "paired_t": "paired t over seeds",
    "hierarchical_bootstrap": "hierarchical bootstrap over seeds and test images",
}


def _pct(level: float) -> str:
    return f"{100 * level:g} %"


def _p(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return report.MISSING
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _signed(value, ci=None) -> str:
    return report.format_value(value, "+.3f", ci)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return report.MISSING
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def label(arm: str) -> str:
    return design.ARM_LABELS.get(arm, arm)


# ----------------------------------------------------------------------------- warnings
def warnings_list(results: Mapping[str, Any]) -> list[str]:
    """Every condition that weakens a figure of this run, in words."""
    cfg, out = results["config"], []
    info = results["dataset"]
    head = results.get("headroom")
    if head is not None and not head["sufficient"]:
        gap = head["test"]
        out.append(
            f"No headroom: real_full beats real_scarce by {gap['gap']:+.3f} test ROC-AUC "
            f"(CI {_ci_text(gap['ci'])}; required >= {gap['min_gap']:g} with a CI above 0). "
            "This run cannot show that synthetic data recovers anything."
        )
    seeds = int(cfg["seeds"])
    if seeds < MIN_SEEDS:
        out.append(
            f"Only {seeds} seeds per arm: the seed-level t intervals have {seeds - 1} degrees "
            "of freedom and are wide."
        )
    small = {k: v for k, v in info["class_counts"]["test"].items() if v < MIN_TEST_PER_CLASS}
    if small:
        out.append(
            "Small test classes ("
            + ", ".join(f"{k}: {v}" for k, v in small.items())
            + f" images, < {MIN_TEST_PER_CLASS}): per-class metrics have wide CIs."
        )
    for kind, q in results.get("quality", {}).items():
        gate = q["gate"]
        if not gate["adequate"]:
            row = next(iter(gate["per_class"].values()))
            out.append(
                f"{kind.upper()} is not adequate at this budget: its synthetic "
                f"{', '.join(gate['failed_classes'])} images are judged as that class "
                f"{_frac(row['synthetic'])} of the time vs {_frac(row['real'])} for real "
                f"images (margin {gate['margin']:g}); its arms say nothing about synthetic data "
                "in general."
            )
        dim = q["feature_space"]["dim"]
        for row, sizes in zip(
            q["distance_matrix"]["rows"], q["distance_matrix"]["min_images"], strict=True
        ):
            if min(sizes) < dim:
                out.append(
                    f"{kind.upper()} FD ({row}) is computed from {min(sizes)} images per set in "
                    f"{dim} feature dimensions: rank-deficient covariances, so FD is biased; "
                    "compare its cells with each other, not with other runs."
                )
                break
        filt = q.get("filter")
        if filt and filt.get("shortfall"):
            out.append(
                f"The filtered {kind.upper()} set is {filt['shortfall']} images short of the "
                f"requested count (attempt cap {filt['max_attempts']}): its arm has a different "
                "class prior from the control."
            )
    for method, entry in results.get("anomaly", {}).items():
        # The anomaly driver words its own below-chance warnings (one per score space).
        out += [f"Anomaly detection, {method}: {w}" for w in entry.get("warnings", [])]
    shipped = [k for k, g in results.get("generators", {}).items() if g.get("source") != "trained"]
    if shipped:
        out.append(
            "Shipped generators were used (" + ", ".join(shipped) + "): trained beforehand on "
            "this exact scarce split by the documented command, not in this run "
            "(`--config.generators=train` retrains them)."
        )
    return out


def _frac(value) -> str:
    return report.MISSING if value is None else f"{100 * value:.1f} %"


def _ci_text(ci) -> str:
    if not ci or ci[0] is None:
        return report.MISSING
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


# ----------------------------------------------------------------------------- sentences
def opening(results: Mapping[str, Any]) -> list[str]:
    """The report's first paragraph: headroom, then a verdict per generator."""
    cfg = results["config"]
    level = _pct(cfg["eval"]["confidence"])
    lines = []
    head = results.get("headroom")
    if head is not None:
        t, v = head["test"], head["val"]
        sufficient = "enough" if head["sufficient"] else "NOT enough"
        lines.append(
            f"**Headroom.** With all real training images (real_full) instead of the scarce "
            f"split, test ROC-AUC changes by {t['gap']:+.3f} (mean of {t['paired_t']['n']} paired "
            f"seeds, {level} CI {_ci_text(t['ci'])}; validation {v['gap']:+.3f}). That is "
            f"{sufficient} room for synthetic data to show a benefit (required: >= "
            f"{t['min_gap']:g} with a CI above 0)."
            + (
                ""
                if head["sufficient"]
                else " **This experiment cannot show a benefit of synthetic data.**"
            )
        )
    alpha = cfg["eval"]["alpha"]
    for c in results["evaluation"]["comparisons"]:
        if not c.get("primary"):
            continue
        arm, ref = c["arm"], c["reference"]
        kind = design.arm_generator(arm)
        gate = results.get("quality", {}).get(kind, {}).get("gate")
        words = {
            "higher": "helped",
            "lower": "hurt",
            "no detectable difference": "made no detectable difference",
        }[c["verdict"]]
        tt = c["paired_t"]
        sentence = (
            f"- **{label(arm)} vs {label(ref)}: {words}** (Holm-adjusted p = "
            f"{_p(c['p_holm'])} at alpha = {alpha:g}; "
            f"{TESTS.get(c['primary_test'], c['primary_test'])}). Test ROC-AUC "
            f"difference {tt['mean']:+.3f} per seed ({level} CI {_ci_text(tt.get('ci'))} over "
            f"{tt['n']} seeds; hierarchical bootstrap CI "
            f"{_ci_text(c['hierarchical_bootstrap']['ci'])})."
        )
        if gate is not None and not gate["adequate"]:
            sentence += (
                f" **The {kind.upper()} generator is not adequate at this budget** (see the "
                "gate below), so this is a statement about this generator, not about synthetic "
                "data."
            )
        elif gate is not None:
            sentence += f" The {kind.upper()} generator passed the quality gate."
            sentence += _gate_disagrees(results, c, arm, kind)
        lines.append(sentence)
    return lines


def _gate_disagrees(results: Mapping[str, Any], c: Mapping[str, Any], arm: str, kind: str) -> str:
    """When an arm whose generator passed the gate lost on validation (CI below 0): the gate's
    proxy and the direct measure of usefulness disagree, which the reader must be told."""
    val = c.get("val") or {}
    ci = val.get("ci")
    if not ci or ci[1] is None or ci[1] >= 0:
        return ""
    variant = results.get("quality", {}).get(kind, {}).get("variants", {}).get(arm, {})
    diversity = ""
    if variant.get("recall") is not None and variant.get("coverage") is not None:
        diversity = (
            f" (its scarce-class images' recall {variant['recall']:.2f} and coverage "
            f"{variant['coverage']:.2f} of real validation images: how much of the real "
            "variety they span)"
        )
    return (
        f" But validation already showed the loss ({val['mean']:+.3f}, CI {_ci_text(ci)}): "
        "class fidelity, the gate's measure, passed images that do not help this "
        f"classifier{diversity}. Passing the gate does not make a generator useful; this "
        "arm's validation difference is the direct measure."
    )


# ----------------------------------------------------------------------------- tables
def setup_table(results: Mapping[str, Any]) -> str:
    cfg, info = results["config"], results["dataset"]
    model = results["classifier_model"]
    train = cfg["classifier"]["train"]
    scarce = cfg["scarcity"]["class_name"]
    counts = info["class_counts"]
    rows = [
        {"what": "dataset", "value": f"{info['name']} ({info['label_kind']})"},
        {"what": "resolution", "value": f"{info['resolution']} px"},
        {
            "what": "images per class",
            "value": "; ".join(
                f"{split} " + ", ".join(f"{k} {v}" for k, v in counts[role].items())
                for role, split in info["split_names"].items()
            ),
        },
        {
            "what": "scarce training split",
            "value": f"{cfg['scarcity']['fraction']:g} of {scarce!r} kept "
            f"({info['scarce_train']['per_class'][scarce]} of {counts['train'][scarce]}; "
            f"scarcity seed {cfg['scarcity']['seed']}), {info['scarce_train']['records']} images",
        },
        {
            "what": "classifier",
            "value": f"{model['name']} ({model['parameters']:,} parameters), "
            f"{train['num_steps']} steps of batch {train['global_batch_size']}, "
            f"{cfg['classifier']['optim']['name']} lr {cfg['classifier']['optim']['lr']:g}",
        },
        {
            "what": "checkpoint selection",
            "value": {
                "best": f"best validation ROC-AUC ({cfg['data']['val_split']!r} split)",
                "last": "the last checkpoint",
            }.get(train["select"], train["select"]),
        },
        {
            "what": "threshold",
            "value": f"{cfg['classifier']['eval']['threshold']} on {cfg['data']['val_split']!r}",
        },
        {"what": "seeds per arm", "value": str(cfg["seeds"])},
        {
            "what": "synthetic images per arm",
            "value": f"{results['synthetic'].get('count', 0)} {scarce!r} images",
        },
    ]
    for kind, g in results.get("generators", {}).items():
        rows.append({"what": f"generator {kind}", "value": g.get("budget", report.MISSING)})
    if results.get("quality"):
        space = next(iter(results["quality"].values()))["feature_space"]
        rows.append(
            {"what": "quality feature space", "value": f"{space['description']} ({space['dim']}-d)"}
        )
    rows.append(
        {
            "what": "wall time",
            "value": ", ".join(
                f"{k} {duration(v)}"
                for k, v in results["wall_time_s"].items()
                if k != "invocations"
            )
            + f" (summed over {results['wall_time_s'].get('invocations', 1)} invocation(s))",
        }
    )
    return report.markdown_table(rows, ["what", "value"])


def comparison_table(results: Mapping[str, Any]) -> str:
    rows = []
    for c in results["evaluation"]["comparisons"]:
        tt, hb = c["paired_t"], c["hierarchical_bootstrap"]
        delong = [d.get("p_value") for d in c.get("delong_per_seed", [])]
        rows.append(
            {
                "arm": label(c["arm"]),
                "vs": label(c["reference"]),
                "AUC diff per seed": _signed(tt["mean"], tt.get("ci")),
                "val diff per seed": _signed(c["val"]["mean"], c["val"].get("ci"))
                if c.get("val")
                else report.MISSING,
                "d_z": report.format_value(tt.get("effect_size"), ".2f", tt.get("effect_size_ci")),
                "p (t)": _p(tt.get("p_value")),
                "p Holm": _p(c.get("p_holm")),
                "hier. bootstrap": _signed(hb.get("mean"), hb.get("ci")),
                "DeLong p per seed": ", ".join(_p(p) for p in delong),
                "verdict": c["verdict"],
            }
        )
    keys = [
        "arm",
        "vs",
        "AUC diff per seed",
        "val diff per seed",
        "d_z",
        "p (t)",
        "p Holm",
        "hier. bootstrap",
        "DeLong p per seed",
        "verdict",
    ]
    if not rows:
        return "(no comparisons ran)\n"
    return report.markdown_table(rows, keys) + "".join(
        f"\n{line}\n" for line in split_disagreements(results)
    )


def split_disagreements(results: Mapping[str, Any]) -> list[str]:
    """A line per comparison whose validation difference is clear (interval excludes 0) and
    of the other sign than test's mean: validation did not predict test there."""
    lines = []
    for c in results["evaluation"]["comparisons"]:
        val, test = c.get("val") or {}, c["paired_t"]
        ci = val.get("ci")
        if not ci or test.get("mean") is None or (ci[0] <= 0 <= ci[1]):
            continue
        if (val["mean"] > 0) != (test["mean"] > 0):
            lines.append(
                f"Validation and test disagree for {label(c['arm'])} vs {label(c['reference'])}: "
                f"{val['mean']:+.3f} on validation (interval excludes 0; the split that chose "
                f"checkpoints and thresholds) but {test['mean']:+.3f} on test. What this arm "
                "changes does not carry over from validation to test images."
            )
    return lines


def _cell(block: Mapping[str, Any] | None, key: str) -> str:
    if not block:
        return report.MISSING
    value = block.get(key)
    if isinstance(value, Mapping):
        return report.format_value(value, ci=value.get("ci"))
    return report.format_value(value, ci=block.get(f"{key}_ci"))


def metric_table(rows: Sequence[tuple[str, Mapping[str, Any] | None]]) -> str:
    table = [{"arm": name, **{k: _cell(b, k) for k in design.METRICS}} for name, b in rows]
    return report.markdown_table(table, ["arm", *design.METRICS])


def quality_tables(results: Mapping[str, Any]) -> list[str]:
    quality = results.get("quality") or {}
    if not quality:
        return []
    lines = ["## Synthetic data: is it worth training on?", ""]
    rows = []
    for kind, q in quality.items():
        synth, real = q["class_fidelity"]["synthetic"], q["class_fidelity"]["real"]
        for name in real:
            s, r = synth.get(name, {}), real[name]
            rows.append(
                {
                    "generator": kind,
                    "class": name,
                    "synthetic: judged as class": _frac(s.get("assigned_fraction")),
                    "synthetic: mean confidence": report.format_value(s.get("mean_confidence")),
                    "real: judged as class": _frac(r.get("assigned_fraction")),
                    "real: mean confidence": report.format_value(r.get("mean_confidence")),
                    "n synthetic / real": f"{s.get('n', 0)} / {r.get('n', 0)}",
                }
            )
    keys = list(rows[0]) if rows else []
    gates = [
        f"- **{kind.upper()}: {'adequate' if q['gate']['adequate'] else 'NOT adequate'}** "
        f"(class fidelity of the synthetic scarce class within {q['gate']['margin']:g} of real "
        "validation images' is the gate)."
        + (
            f" Fine detail (mean |Laplacian|, {q['fine_detail']['n'][0]} synthetic vs "
            f"{q['fine_detail']['n'][1]} real validation images of the scarce class): "
            f"{q['fine_detail']['synthetic']:.3f} vs {q['fine_detail']['real']:.3f}, ratio "
            f"{q['fine_detail']['ratio']:.2f} (the judge does not see this; 1 = as sharp as "
            "real)."
            if (q.get("fine_detail") or {}).get("ratio") is not None
            else ""
        )
        + (
            f" Filter: kept {q['filter']['accepted']} of {q['filter']['attempts']} drawn "
            f"({_frac(q['filter']['acceptance_rate'])}) at tau = "
            f"{q['filter']['threshold']:.3f}."
            if q.get("filter")
            else ""
        )
        for kind, q in quality.items()
    ]
    lines += [
        "Class fidelity (GAN-test): the judge, a classifier trained only on the scarce real "
        "split the generators saw, labels synthetic images of each intended class; real "
        f"{results['config']['quality']['real_split']!r} images of the class are the reference.",
        "",
        report.markdown_table(rows, keys),
        *gates,
        "",
    ]
    cas = results.get("cas") or {}
    if cas:
        real = cas.get("real", {}).get("val_auc")
        crow = [
            {
                "trained on": "real images (control)" if name == "real" else f"{name} synthetic",
                "images": report.format_value(entry.get("train_records")),
                "validation ROC-AUC": report.format_value(entry.get("val_auc")),
                "vs real control": _signed(
                    None
                    if real is None or entry.get("val_auc") is None
                    else entry["val_auc"] - real
                ),
            }
            for name, entry in cas.items()
        ]
        lines += [
            "Classification accuracy score (CAS): the judge's recipe trained on synthetic "
            "images only (every class, same counts and budget), tested on real validation "
            "images, beside the same recipe on as many real images.",
            "",
            report.markdown_table(crow, list(crow[0])),
        ]
    for kind, q in quality.items():
        m = q["distance_matrix"]
        mrows = [
            {
                "": row,
                **{
                    col: report.format_value(v, ".4g")
                    for col, v in zip(m["columns"], fds, strict=True)
                },
            }
            for row, fds in zip(m["rows"], m["fd"], strict=True)
        ]
        lines += [
            f"{kind.upper()}: Fréchet distance between each synthetic class and each real class "
            f"({q['feature_space']['description']}); nearest real class per row: "
            + ", ".join(f"{k} -> {v}" for k, v in q["nearest_real_class"].items())
            + ".",
            "",
            report.markdown_table(mrows, ["", *m["columns"]], float_fmt=".4g"),
        ]
    mvu = results.get("metric_vs_utility")
    if mvu and mvu["rows"]:
        keys = ["arm", "auc_change", *UTILITY_KEYS]
        urows = [{k: report.format_value(r.get(k), ".3g") for k in keys} for r in mvu["rows"]]
        agree = [
            {
                "metric": metric,
                "n": a["n"],
                "Kendall tau": report.format_value(a["kendall_tau"], "+.2f"),
                "Spearman rho": report.format_value(a["spearman_rho"], "+.2f"),
            }
            for metric, a in mvu["rank_agreement"].items()
        ]
        lines += [
            "Do the quality metrics predict usefulness? Each synthetic arm's quality metrics "
            "(on its own set, scarce class) beside its test ROC-AUC change against the "
            "oversampled control (mean per-seed difference), and each metric's rank agreement "
            "with that change (+1: ranks the arms exactly as their utility; n/a below 3 arms).",
            "",
            report.markdown_table(urows, keys),
            report.markdown_table(agree, ["metric", "n", "Kendall tau", "Spearman rho"]),
        ]
    return lines


def anomaly_table(results: Mapping[str, Any]) -> list[str]:
    anomaly = results.get("anomaly") or {}
    if not anomaly:
        return []
    rows = []
    for method, entry in anomaly.items():
        spaces = entry.get("spaces") or {"pixels": {"val": entry["val"], "test": entry["test"]}}
        for space, block in spaces.items():
            rows.append(
                {
                    "method": method,
                    "space": space + (" (primary)" if space == entry.get("primary_space") else ""),
                    "val auc": report.format_value(block["val"].get("auc")),
                    "test auc": _cell(block["test"], "auc"),
                    "generator trained on": entry["generator_trained_on"],
                }
            )
    return [
        "## Anomaly detection (normal vs abnormal, test split)",
        "",
        "Scores are fixed in advance as higher = more anomalous; the reconstruction error is "
        "measured in pixels and in the judge's feature space; thresholds (and DDPM's t*) are "
        "chosen on validation.",
        "",
        report.markdown_table(
            rows, ["method", "space", "val auc", "test auc", "generator trained on"]
        ),
    ]


def jobs_table(results: Mapping[str, Any]) -> list[str]:
    """Sub-runs that ran as jobs (launcher submitit): their last job's id, node, wall time and
    exit state; sub-runs finished before (or inline) are not listed."""
    jobs = results.get("jobs") or {}
    if not jobs:
        return []
    lines = [
        "## Jobs",
        "",
        "| sub-run | job id | node | wall time | exit state | attempts |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, job in jobs.items():
        lines.append(
            f"| {name} | {job['job_id']} | {job.get('node') or report.MISSING} | "
            f"{duration(job.get('wall_time_s'))} | {job['state']} | {job['attempts']} |"
        )
    return [*lines, ""]


def profile_tables(results: Mapping[str, Any]) -> list[str]:
    """Where this invocation's wall time went: each stage's sections, then the sums of its
    sub-runs' own profiles (JAX's tracing and compiles are counted once, in "trace" and
    "compile")."""
    prof = results.get("profile") or {}
    stages = prof.get("stages") or {}
    if not stages:
        return []
    first = ["sub-runs", "trace", "compile"]
    last = ["rest", "total"]
    middle = sorted({k for v in stages.values() for k in v} - {*first, *last})
    columns = [c for c in first if any(c in v for v in stages.values())] + middle + last
    lines = [
        "## Where the time went",
        "",
        f"Wall seconds of {prof.get('scope', 'this invocation')}; JAX's persistent "
        f"compilation cache: {prof.get('compile_cache') or 'not used'}.",
        "",
        "| stage | " + " | ".join(columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for stage, row in stages.items():
        cells = [f"{row[c]:.1f}" if c in row else "" for c in columns]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    subs = prof.get("sub_runs") or {}
    if subs:
        kinds = ["setup", "trace", "compile", "checkpoint", "data", "eval", "finish", "steps"]
        kinds.append("total")
        lines += [
            "",
            "Sub-runs trained in this invocation, their own profiles summed (steps = the "
            "training steps' compute; eval = periodic validation; finish = final evaluation "
            "and results; setup = data preparation and models; trace = JAX tracing and "
            "lowering; compile = XLA compiles or persistent-cache loads):",
            "",
            "| stage | sub-runs | " + " | ".join(kinds) + " |",
            "| --- | --- |" + " --- |" * len(kinds),
        ]
        for stage, row in subs.items():
            cells = [f"{row.get(k, 0.0):.1f}" for k in kinds]
            lines.append(f"| {stage} | {row['count']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def markdown(results: Mapping[str, Any], figures: Mapping[str, str], captions) -> str:
    cfg, info = results["config"], results["dataset"]
    level = _pct(cfg["eval"]["confidence"])
    arms = results["arms"]
    warnings = results.get("warnings", [])
    lines = [
        f"# Experiment report: {info['name']} ({results['preset']})",
        "",
        *opening(results),
        "",
        f"Primary test: paired t on per-seed test ROC-AUC differences (seed k of both arms "
        f"shares data order and initialisation), Holm-corrected over the "
        f"{len(results['evaluation']['comparisons'])} comparisons of this run at alpha = "
        f"{cfg['eval']['alpha']:g}; {level} intervals. Each generator arm is compared with "
        "the oversampled control (the same class prior without new images).",
        "",
        "## Setup",
        "",
        setup_table(results),
        "## Warnings",
        "",
        *([f"- {w}" for w in warnings] or ["- None."]),
        "",
        "## Comparisons (test ROC-AUC)",
        "",
        comparison_table(results),
        f"## Test metrics per arm (mean ± std over seeds [{level} t-interval])",
        "",
        metric_table([(a["label"], a["aggregate"]) for a in arms.values()]),
        f"## Test metrics of the seed-averaged scores ({level} bootstrap CIs over test images)",
        "",
        metric_table([(a["label"], a["seed_mean"]) for a in arms.values()]),
        f"Metrics: {results['evaluation']['headline']}.",
        "",
        *quality_tables(results),
        *anomaly_table(results),
        *jobs_table(results),
        *profile_tables(results),
        "",
        "## Figures",
        "",
    ]
    for name, path in figures.items():
        caption = captions(name)
        lines += [f"**{caption}** (`{path}`)", "", f"![{caption}]({path})", ""]
    lines += [
        "## Where each number comes from",
        "",
        f"- Training: generators, the judge and classifiers read the "
        f"{cfg['data']['train_split']!r} split (scarce subset except real_full) and synthetic "
        "folders only.",
        f"- Checkpoint selection and thresholds: the {cfg['data']['val_split']!r} split.",
        f"- Reported metrics: the {cfg['data']['test_split']!r} split, read once per run.",
        f"- Synthetic quality and CAS: real {cfg['quality']['real_split']!r} images.",
        "",
        "Software: " + ", ".join(f"{k} {v}" for k, v in results["software"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures
def save_sample_grid(rows: Sequence[tuple[str, np.ndarray]], path: str, *, per_row: int = 8):
    """Rows of uint8 images [N, H, W] with a label each, every image drawn at >= 64 px
    (nearest-neighbour: no smoothing hides artefacts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = 1.0  # inches per image: at 100 dpi each image is drawn >= 70 px wide
    fig, axes = plt.subplots(
        len(rows), per_row, figsize=(cell * per_row + 2.2, cell * len(rows)), squeeze=False
    )
    for r, (name, images) in enumerate(rows):
        for c in range(per_row):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                ax.imshow(images[c], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=2.0 / (cell * per_row + 2.2), right=0.99, wspace=0.04, hspace=0.04)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_roc_bands(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str, *, level: float, title: str
) -> str:
    """Per arm: the mean ROC over seeds with a t-interval band (scores [seeds, N])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scipy.stats
    from sklearn.metrics import roc_curve

    grid = np.linspace(0.0, 1.0, 101)
    fig, ax = plt.subplots(figsize=(6.5, 6.0))
    for name, (y, scores) in curves.items():
        tprs = []
        for s in scores:
            fpr, tpr, _ = roc_curve(y, s)
            tprs.append(np.interp(grid, fpr, tpr))
        tprs = np.array(tprs)
        mean = tprs.mean(axis=0)
        line = ax.plot(grid, mean, label=name, linewidth=1.4)[0]
        if len(tprs) > 1:
            half = (
                scipy.stats.t.ppf(0.5 + level / 2, len(tprs) - 1)
                * tprs.std(axis=0, ddof=1)
                / math.sqrt(len(tprs))
            )
            ax.fill_between(
                grid, np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1), alpha=0.15,
                color=line.get_color(),
            )  # fmt: skip
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
