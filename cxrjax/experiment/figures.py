"""The experiment's figures (figures/*.png) and their captions."""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import numpy as np

from cxrjax import report
from cxrjax.data import mixing
from cxrjax.experiment import design, stages
from cxrjax.experiment import report as report_lib

PER_ROW = 8


def _metric_series(path: str, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric in a metrics.jsonl; a torn last line is skipped."""
    steps, values = [], []
    if not os.path.exists(path):
        return steps, values
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            value = row.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                steps.append(row["step"])
                values.append(value)
    return steps, values


def sample_rows(config, data, synthetic) -> list[tuple[str, np.ndarray]]:
    """Per class: real validation images, then each generator's synthetic images of it."""
    from cxrjax import quality

    spec = data["spec"]
    resolution = int(config.data.resolution)
    scarce = config.scarcity.class_name
    sets = synthetic.get("sets", {})
    names = list(spec.class_names) if len(spec.class_names) <= 4 else [scarce]
    rows = []
    for c, name in enumerate(names):
        members = mixing.class_indices(data["labels"]["val"], name, spec.class_names)
        chosen = stages.cap(members, PER_ROW, 20 + c)
        real = stages.decode(data["splits"]["val"], chosen, resolution)
        rows.append((f"real {name}", real))
        for kind in design.needed_generators(config):
            if name == scarce:
                keys = [(kind, kind.upper()), (f"{kind}_filtered", f"{kind.upper()} filtered")]
            else:
                keys = [(f"{kind}_quality_{name}", kind.upper())]
            for key, tag in keys:
                if key in sets:
                    folder = quality.load_image_folder(sets[key]["folder"], resolution=resolution)
                    rows.append((f"{tag} {name}", folder.images[:PER_ROW]))
    return rows


def make_figures(
    config, workdir, runs, data, synthetic, quality, anomaly, extras
) -> dict[str, str]:
    """figures/*.png (relative paths by name)."""
    figures_dir = os.path.join(workdir, "figures")
    os.makedirs(figures_dir, exist_ok=True)
    figures: dict[str, str] = {}

    def rel(path) -> str:
        return os.path.relpath(str(path), workdir)

    rows = sample_rows(config, data, synthetic)
    if len(rows) > len(data["spec"].class_names):
        figures["samples"] = rel(
            report_lib.save_sample_grid(rows, os.path.join(figures_dir, "samples.png"))
        )
    y = extras["y"]["test"]
    curves = {report_lib.label(arm): (y, extras["scores"][arm]["test"]) for arm in config.arms}
    figures["roc_arms"] = rel(
        report_lib.save_roc_bands(
            curves,
            os.path.join(figures_dir, "roc_arms.png"),
            level=float(config.eval.confidence),
            title=f"Test ROC per arm: mean over {config.seeds} seeds with a "
            f"{100 * config.eval.confidence:g} % t-band",
        )
    )
    series = {}
    for arm in config.arms:
        steps, values = _metric_series(
            os.path.join(runs[f"arms/{arm}/seed0"][1], "metrics.jsonl"), "val/auc"
        )
        if steps:
            series[report_lib.label(arm)] = (steps, values)
    if series:
        figures["curves_classifier_auc"] = rel(
            report.save_line_plot(
                series,
                os.path.join(figures_dir, "curves_classifier_auc.png"),
                title="validation AUC, seed 0",
            )
        )
    keys = {"pggan": ("train/d/d_loss", "train/g/g_loss"), "ddpm": ("train/loss",)}
    for name, (kind, sub_workdir, _) in runs.items():
        if kind not in design.GENERATORS:
            continue
        series = {}
        for key in keys[kind]:
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
    figures.update(explain_figures(config, workdir, runs, data, figures_dir))
    for kind in quality:
        folder = os.path.join(workdir, "quality", kind)
        for file in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if file.endswith(".png") and "embedding" in file:
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


def explain_figures(config, workdir, runs, data, figures_dir) -> dict[str, str]:
    """CAM overlays of every arm (seed 0) on the same validation films, a few of each class."""
    from cxrjax import explain

    spec = data["spec"]
    if spec.label_kind != "multiclass" or not config.figures.explain_per_class:
        return {}
    indices = []
    for c, name in enumerate(spec.class_names):
        members = mixing.class_indices(data["labels"]["val"], name, spec.class_names)
        indices += [int(i) for i in stages.cap(members, config.figures.explain_per_class, 30 + c)]
    out = {}
    for arm in config.arms:
        target = os.path.join(figures_dir, "explain", arm)
        paths = explain.overlays(
            runs[f"arms/{arm}/seed0"][1], "val", indices, method="cam", output_dir=target
        )
        out[f"explain_{arm}"] = os.path.relpath(paths[0], workdir)
    return out


def caption(name: str) -> str:
    """A reader's caption for a figure name from `make_figures`."""
    fixed = {
        "samples": "Real validation images (first row of each class) and synthetic images of "
        "each generator, every image drawn at >= 64 px (nearest neighbour)",
        "roc_arms": "Test ROC curves per arm (mean over seeds, t-interval band)",
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
    if kind and rest.startswith("embedding_"):
        return f"{kind}: real vs synthetic features ({rest.removeprefix('embedding_').upper()})"
    if head == "explain":
        arm = rest
        return (
            f"Where the classifier looks (CAM, seed 0): {report_lib.label(arm)}, the same "
            "validation films for every arm"
        )
    if head == "anomaly":
        method, _, figure = rest.rpartition("_")
        what = {"roc": "ROC (val, test)", "residuals": "input / reconstruction / residual"}
        return f"Anomaly detection, {method}: {what.get(figure, figure)}"
    return name.replace("_", " ")


def describe(figures: dict[str, str]) -> dict[str, Any]:
    return {name: caption(name) for name in figures}
