"""People-facing output shared by every evaluate/report entry point: Markdown tables and PNGs.

Figures use matplotlib's object API (`Figure` rendered by the Agg canvas), never pyplot: no
display, no global figure registry to leak, and importing this module changes no backend for
anyone else. Metric numbers come from `cxrjax.metrics.classification` (and sklearn's curve
functions), so a plotted AUC is the AUC in results.json.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sklearn import metrics as skm

from cxrjax import fileio
from cxrjax.metrics import classification

MISSING = "n/a"

# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def format_value(value: Any, float_fmt: str = ".3f", ci: Sequence[float] | None = None) -> str:
    """One table cell: `0.953 [0.931, 0.970]` with a CI, `0.953 ± 0.012` for a seed aggregate
    ({mean, std} from `aggregate_seeds`), n/a for None or NaN, text with `|` escaped."""
    if isinstance(value, Mapping) and "mean" in value:
        text = format_value(value["mean"], float_fmt)
        if value.get("std") is not None:
            text += f" ± {format(value['std'], float_fmt)}"
    elif value is None or (isinstance(value, float | np.floating) and not math.isfinite(value)):
        return MISSING
    elif isinstance(value, bool | np.bool_):
        text = str(bool(value))
    elif isinstance(value, int | np.integer):
        text = str(int(value))
    elif _is_number(value):
        text = format(float(value), float_fmt)
    else:
        text = str(value).replace("|", "\\|").replace("\n", " ")
    if ci is not None and all(_is_number(c) for c in ci):
        text += f" [{format(ci[0], float_fmt)}, {format(ci[1], float_fmt)}]"
    return text


def _lookup(row: Mapping, key: str) -> Any:
    """row[key], or a nested value by dotted path ("macro.auc" -> row["macro"]["auc"])."""
    if key in row:
        return row[key]
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | Mapping[str, str],
    float_fmt: str = ".3f",
) -> str:
    """GitHub Markdown table of `rows` (e.g. `evaluate` results plus a "model" key).

    `columns` are row keys (dotted paths reach nested dicts, e.g. "macro.auc") or a
    {key: header} mapping. A sibling `{key}_ci` = [lo, hi] is shown as `0.953 [0.931, 0.970]`.
    Columns whose cells are all numbers are right-aligned.
    """
    headers = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
    body = []
    numeric = dict.fromkeys(headers, True)
    for row in rows:
        cells = []
        for key in headers:
            value = _lookup(row, key)
            cells.append(format_value(value, float_fmt, _lookup(row, f"{key}_ci")))
            if value is not None and not (_is_number(value) or isinstance(value, Mapping)):
                numeric[key] = False
        body.append(cells)
    lines = [
        "| " + " | ".join(format_value(h) for h in headers.values()) + " |",
        "| " + " | ".join("---:" if numeric[k] else "---" for k in headers) + " |",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly: PNG without any GUI backend
    with fileio.atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=fig.dpi, bbox_inches="tight")
    return path


def _binary_curve_inputs(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int)
    s = classification.positive_scores(scores)
    if y.shape != s.shape:
        raise ValueError(f"{y.shape[0]} labels but {s.shape[0]} scores")
    return y, s


def roc_figure(curves: Mapping[str, tuple[Any, Any]], title: str = "ROC") -> Figure:
    """ROC curves of binary (y_true, scores) pairs, AUC in the legend, chance diagonal."""
    fig = Figure(figsize=(5, 5), dpi=120)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1)
    for name, (y_true, scores) in curves.items():
        y, s = _binary_curve_inputs(y_true, scores)
        if y.min() == y.max():  # one class: no curve, but say why it is missing
            ax.plot([], [], label=f"{name} (AUC {MISSING}: one class)")
            continue
        fpr, tpr, _ = skm.roc_curve(y, s)
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC = {skm.roc_auc_score(y, s):.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)")
    ax.set(ylabel="True positive rate (sensitivity)", title=title, aspect="equal")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def pr_figure(curves: Mapping[str, tuple[Any, Any]], title: str = "Precision-recall") -> Figure:
    """Precision-recall curves, average precision in the legend, prevalence as a dotted line."""
    fig = Figure(figsize=(5, 5), dpi=120)
    ax = fig.add_subplot()
    for name, (y_true, scores) in curves.items():
        y, s = _binary_curve_inputs(y_true, scores)
        if y.sum() == 0:
            ax.plot([], [], label=f"{name} (AP {MISSING}: no positives)")
            continue
        precision, recall, _ = skm.precision_recall_curve(y, s)
        ap = skm.average_precision_score(y, s)
        (line,) = ax.step(
            recall, precision, where="post", linewidth=1.5, label=f"{name} (AP = {ap:.3f})"
        )
        ax.axhline(y.mean(), linestyle=":", linewidth=1, color=line.get_color())
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="Recall (sensitivity)", ylabel="Precision")
    ax.set(title=title, aspect="equal")
    ax.legend(loc="lower left", fontsize="small")
    return fig


def save_roc_curves(
    curves: Mapping[str, tuple[Any, Any]], path: str | os.PathLike, title: str = "ROC"
) -> Path:
    """PNG of `roc_figure`: {name: (y_true, scores)}; scores [N] or [N, 2]."""
    return _save(roc_figure(curves, title), path)


def save_pr_curves(
    curves: Mapping[str, tuple[Any, Any]],
    path: str | os.PathLike,
    title: str = "Precision-recall",
) -> Path:
    """PNG of `pr_figure`: {name: (y_true, scores)}; scores [N] or [N, 2]."""
    return _save(pr_figure(curves, title), path)


def save_confusion_matrix(
    cm: Any,
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "Confusion matrix",
    normalize: bool = False,
) -> Path:
    """PNG heat map of a [C, C] confusion matrix (rows = true class), counts in each cell.

    `normalize=True` colours by row fraction (per-class recall on the diagonal) and prints both
    the fraction and the count, which stays readable under class imbalance.
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names):
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(class_names)} classes")
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    shown = frac if normalize else cm
    size = max(4.0, 0.6 * len(class_names) + 2)
    fig = Figure(figsize=(size, size), dpi=120)
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(cm.max(), 1))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, labels=class_names)
    ax.set(xlabel="Predicted", ylabel="True", title=title)
    cutoff = 0.5 * (1 if normalize else max(cm.max(), 1))
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            text = f"{frac[i, j]:.2f}\n({cm[i, j]})" if normalize else str(cm[i, j])
            color = "white" if shown[i, j] > cutoff else "black"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize="small")
    return _save(fig, path)


def _to_uint8(images: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    if images.dtype == np.uint8:
        return images
    if value_range is None:
        # generators emit [-1, 1]; data pipelines [0, 1]
        value_range = (-1.0, 1.0) if images.min() < 0 else (0.0, 1.0)
    lo, hi = value_range
    scaled = (images.astype(np.float64) - lo) / (hi - lo)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def save_image_grid(
    images: Any,
    path: str | os.PathLike,
    nrow: int = 8,
    labels: Sequence[str] | None = None,
    padding: int = 2,
    value_range: tuple[float, float] | None = None,
) -> Path:
    """PNG grid of images [N, H, W], [N, H, W, 1] or [N, H, W, 3], `nrow` images per row.

    uint8 is written as is; floats map `value_range` to 0..255 (default [-1, 1] if any value is
    negative, else [0, 1]). Without labels the PNG holds the exact pixels (black padding);
    with labels each tile gets a caption, drawn by matplotlib.
    """
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4) or len(images) == 0:
        raise ValueError(f"images must be non-empty [N, H, W(, 1 or 3)], got {images.shape}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    pixels = _to_uint8(images, value_range)
    n, h, w = pixels.shape[:3]
    ncol = max(1, min(nrow, n))
    nrows = math.ceil(n / ncol)
    if labels is None:
        shape = (nrows * h + (nrows + 1) * padding, ncol * w + (ncol + 1) * padding)
        grid = np.zeros(shape + pixels.shape[3:], np.uint8)
        for k in range(n):
            r, c = divmod(k, ncol)
            top, left = padding + r * (h + padding), padding + c * (w + padding)
            grid[top : top + h, left : left + w] = pixels[k]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        return path
    fig = Figure(figsize=(1.6 * ncol, 1.8 * nrows), dpi=120)
    for k in range(n):
        ax = fig.add_subplot(nrows, ncol, k + 1)
        ax.imshow(pixels[k], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(str(labels[k]), fontsize="small")
        ax.axis("off")
    return _save(fig, path)


def save_line_plot(
    series: Mapping[str, Any],
    path: str | os.PathLike,
    title: str | None = None,
    xlabel: str = "step",
    ylabel: str | None = None,
    log_y: bool = False,
) -> Path:
    """PNG of training curves: {name: values} (x = 0, 1, ...) or {name: (x, values)}."""
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    for name, data in series.items():
        if isinstance(data, tuple) and len(data) == 2:
            x, y = np.asarray(data[0], dtype=np.float64), np.asarray(data[1], dtype=np.float64)
        else:
            y = np.asarray(data, dtype=np.float64)
            x = np.arange(len(y))
        if x.shape != y.shape or y.ndim != 1:
            raise ValueError(f"{name}: x {x.shape} and values {y.shape} must be equal-length 1-D")
        ax.plot(x, y, linewidth=1.2, label=name)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel or "", title=title or "")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize="small")
    return _save(fig, path)
