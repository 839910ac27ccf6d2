"""Reporting for `cxrjax.anomaly.evaluate`: below-chance warnings, results.md and the figures.

Split from `cxrjax.anomaly` (which re-exports `write_markdown` and `save_residual_figure`);
nothing here scores images or chooses anything: it only describes what evaluation measured.
Every score is oriented in advance (higher = more anomalous) and never flipped, so a score
that ranks normals above abnormals on validation is reported as below chance, with a warning.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cxrjax import fileio, parallel, report
from cxrjax.data import mixing, pipeline
from cxrjax.train import loop

SPACE_TITLES = {"pixels": "pixel space", "features": "classifier feature space"}


def below_chance_warnings(method: str, spaces: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One plain sentence per score space whose validation ROC-AUC is below 0.5."""
    out = []
    for space, entry in spaces.items():
        auc = entry["val"].get("auc")
        if auc is not None and auc < 0.5:
            out.append(
                f"{method} {space}-space score is below chance on validation (ROC-AUC "
                f"{auc:.3f} < 0.5): it ranks normal images as more anomalous than abnormal "
                "ones. The score's direction (higher = more anomalous) was fixed in advance "
                "and is not flipped; do not read this score as a detector."
            )
    return out


def example_indices(y: np.ndarray, index: np.ndarray, k: int) -> np.ndarray:
    """The first k normal and first k abnormal records (in record order)."""
    normal, abnormal = index[y == 0][:k], index[y == 1][:k]
    return np.concatenate([normal, abnormal]).astype(np.int64)


def scorer_batches(scorer, source, spec, *, batch_size: int, num_workers: int = 0):
    """Eval batches of `source` as `scorer` takes them: its resolution (films padded onto a
    generator's canvas when it has one), pixels in [-1, 1]."""
    return pipeline.make_eval_dataset(
        source,
        spec,
        global_batch_size=batch_size,
        resolution=scorer.resolution,
        content_resolution=scorer.content_resolution,
        normalization="generator",
        num_workers=num_workers,
    )


def save_residual_figure(
    scorer, source, spec, record_indices, captions, path: str, *, batch_size, mesh=None
) -> str | None:
    """PNG: columns = the given records; rows = input / reconstruction / |residual|.

    Residuals share one grey scale (0 .. the largest shown value), so columns compare.
    Returns the path, or None when there is nothing to show.
    """
    if len(record_indices) == 0:
        return None
    mesh = mesh or parallel.make_mesh()
    part = mixing.Part(source, name="examples", indices=np.sort(np.asarray(record_indices)))
    batches = scorer_batches(scorer, part, spec, batch_size=batch_size)
    rows: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for batch in batches:
        arrays = loop.device_batch(batch, mesh)
        out = scorer.outputs(arrays["image"], indices=arrays["index"])
        wanted = {k: out[k] for k in ("map", "reconstruction") if k in out}
        host = parallel.to_host(
            {**wanted, "image": arrays["image"], "mask": arrays["mask"], "index": arrays["index"]}
        )
        keep = np.asarray(host.pop("mask"), bool)
        for key, value in host.items():
            rows[key].append(np.asarray(value)[keep])
    got = {key: np.concatenate(values) for key, values in rows.items()}
    # Back to the caller's column order.
    position = {int(i): k for k, i in enumerate(got["index"])}
    order = np.asarray([position[int(i)] for i in record_indices])
    to_uint8 = lambda x: np.clip(np.round((x[..., 0] + 1.0) * 127.5), 0, 255).astype(np.uint8)
    tiles, labels = [to_uint8(got["image"][order])], list(captions)
    if "reconstruction" in got:
        tiles.append(to_uint8(got["reconstruction"][order]))
        labels += ["reconstruction"] * len(order)
    maps = got["map"][order]
    vmax = max(float(maps.max()), 1e-6)
    tiles.append(np.round(np.clip(maps / vmax, 0, 1) * 255).astype(np.uint8))
    labels += [f"|residual| (max {vmax:.2f})"] * len(order)
    if not parallel.is_main_process():
        return None
    report.save_image_grid(np.concatenate(tiles), path, nrow=len(order), labels=labels)
    return path


def save_roc_figure(scored: Mapping[str, Mapping[str, Any]], spaces: Sequence[str], path, method):
    """roc.png: val and test curves of every score space (one space: "val" / "test")."""
    curves = {}
    for space in spaces:
        for split in ("val", "test"):
            name = split if len(spaces) == 1 else f"{split} ({space})"
            curves[name] = (scored[split]["y"], scored[split][f"score/{space}"])
    report.save_roc_curves(curves, path, title=f"ROC ({method})")


_COLUMNS = {
    "split": "split",
    "auc": "ROC-AUC",
    "pr_auc": "PR-AUC",
    "accuracy": "accuracy",
    "precision": "precision",
    "recall": "recall",
    "specificity": "specificity",
    "f1": "F1",
}


def _table(val: Mapping[str, Any], test: Mapping[str, Any]) -> str:
    rows = []
    for split, result in (("val", val), ("test", test)):
        row = {"split": f"{split} ({result['n']}, {result['n_positive']} abnormal)"}
        for key in list(_COLUMNS)[1:]:
            row[key] = report.format_value(result.get(key), ci=result.get(f"{key}_ci"))
        rows.append(row)
    return report.markdown_table(rows, _COLUMNS)


def write_markdown(path: str, results: Mapping[str, Any]) -> None:
    data, scorer = results["dataset"], results["scorer"]
    boot = results["test"].get("bootstrap", {})
    spaces = results.get("scores") or {}
    primary = results.get("primary_score", "pixels")
    lines = [
        f"# Anomaly detection ({results['method']}): {data['name']}",
        "",
        f"Normal: `{data['normal_class']}`; abnormal: {', '.join(data['abnormal_classes'])}. "
        f"Score: {scorer.get('score')}. Generator: {scorer.get('generator_workdir')} "
        f"(step {scorer.get('generator_step')}). Every score is oriented in advance: higher = "
        "more anomalous (never flipped after looking at the data).",
        "",
    ]
    for warning in results.get("warnings", []):
        lines += [f"**Warning:** {warning}", ""]
    selection = results.get("t_star_selection")
    if selection:
        aucs = ", ".join(
            f"t* = {t}: {report.format_value(v.get(selection['space']))}"
            for t, v in selection["val_auc"].items()
        )
        lines += [
            f"t* chosen on validation = {selection['chosen']} (best validation ROC-AUC in "
            f"{selection['space']} space; grid {aucs}); test scored once, at t* = "
            f"{selection['chosen']}.",
            "",
        ]
    lines += [
        f"Threshold ({results['threshold_method']}) chosen on validation = "
        f"{results['threshold']:.6g}, applied unchanged to test. Test brackets: "
        f"{boot.get('level', 0.95):.0%} bootstrap CIs ({boot.get('n_resamples', 0)} resamples "
        "of test images).",
        "",
    ]
    if len(spaces) > 1:
        for space, entry in spaces.items():
            mark = " (primary: the top-level val/test of results.json)" if space == primary else ""
            lines += [
                f"## {SPACE_TITLES.get(space, space)}{mark}",
                "",
                f"Score: {entry['description']}. Threshold on validation = "
                f"{entry['threshold']:.6g}.",
                "",
                _table(entry["val"], entry["test"]),
            ]
    else:
        lines.append(_table(results["val"], results["test"]))
    if results.get("terms"):
        lines += ["Each pixel-space score term alone (ROC-AUC val / test):", ""]
        for name, value in results["terms"].items():
            lines.append(
                f"- {name}: {report.format_value(value['val']['auc'])} / "
                f"{report.format_value(value['test']['auc'])}"
            )
        lines.append("")
    directory = os.path.dirname(path)
    for title, name in (("ROC", "roc.png"), ("Residuals", "residuals.png")):
        if os.path.exists(os.path.join(directory, name)):
            lines.append(f"![{title}]({name})")
    if os.path.exists(os.path.join(directory, "residuals.png")):
        lines += [
            "",
            "residuals.png: columns are the first normal then the first abnormal test images "
            f"(caption: class and {primary}-space score); rows are input, reconstruction and "
            "|residual|.",
        ]
    fileio.write_text(path, "\n".join(lines) + "\n")
