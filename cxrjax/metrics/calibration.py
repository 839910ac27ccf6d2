"""Whether a classifier's probabilities can be trusted: ECE, Brier score, reliability diagrams,
temperature scaling.

What is calibrated (the probability a clinical reader would be shown):
  binary (2 classes)  P(class 1), e.g. P(pneumonia), against the class-1 frequency
  multi-class         the top-label confidence against top-label accuracy (Guo et al. 2017)
  multi-label         each finding's P(finding) against its frequency; the headline numbers
                      are the means over findings (per finding in "per_class")

ECE = sum over B equal-width bins of (n_b / N) |observed_b - mean probability_b| (B = 10).
Brier = mean squared difference between probability and outcome: binary and per finding on
the calibrated probability; multi-class the original multi-category score,
sum_c (p_c - 1[y = c])^2 averaged over images (0 = perfect, 2 = worst).
CIs: percentile bootstrap over images (the same resampling as the classification metrics).

Temperature scaling (Guo et al. 2017): one scalar T > 0 fitted on validation by minimising the
negative log-likelihood of logits / T (logits recovered from the probabilities: log p for
softmax, log(p / (1 - p)) for sigmoid); it leaves rankings, hence AUC, unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import optimize

NUM_BINS = 10
EPS = 1e-7


def _kind(labels: np.ndarray, probs: np.ndarray) -> str:
    if probs.ndim == 2 and labels.ndim == 2:
        return "multilabel"
    return "binary" if probs.shape[-1] == 2 else "multiclass"


def _targets(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probability [N] or [N, K], outcome [N] or [N, K]) that the module docstring calibrates."""
    kind = _kind(labels, probs)
    if kind == "multilabel":
        return probs, labels.astype(np.float64)
    if kind == "binary":
        return probs[:, 1], (labels == 1).astype(np.float64)
    return probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64)


def reliability(prob: np.ndarray, outcome: np.ndarray, num_bins: int = NUM_BINS) -> dict:
    """Per equal-width bin: count, mean probability, observed frequency (NaN when empty)."""
    prob, outcome = np.asarray(prob, np.float64), np.asarray(outcome, np.float64)
    index = np.clip((prob * num_bins).astype(int), 0, num_bins - 1)  # p = 1 -> last bin
    counts = np.bincount(index, minlength=num_bins).astype(np.float64)
    sums = np.bincount(index, weights=prob, minlength=num_bins)
    hits = np.bincount(index, weights=outcome, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "edges": np.linspace(0.0, 1.0, num_bins + 1),
            "count": counts,
            "confidence": sums / counts,
            "observed": hits / counts,
        }


def ece(prob: np.ndarray, outcome: np.ndarray, num_bins: int = NUM_BINS) -> float:
    """Expected calibration error of probabilities `prob` [N] for 0/1 outcomes [N]."""
    table = reliability(prob, outcome, num_bins)
    used = table["count"] > 0
    gaps = np.abs(table["observed"][used] - table["confidence"][used])
    return float(np.sum(table["count"][used] / len(prob) * gaps))


def brier(labels: np.ndarray, probs: np.ndarray) -> float:
    """Brier score (module docstring): binary/multi-label mean, multi-class multi-category."""
    labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
    if _kind(labels, probs) == "multiclass":
        one_hot = np.eye(probs.shape[1])[labels.astype(int)]
        return float(np.mean(np.sum((probs - one_hot) ** 2, axis=1)))
    prob, outcome = _targets(labels, probs)
    return float(np.mean((prob - outcome) ** 2))


def _point(labels: np.ndarray, probs: np.ndarray, num_bins: int) -> dict[str, float]:
    prob, outcome = _targets(labels, probs)
    if prob.ndim == 2:  # multi-label: mean over findings
        value = np.mean([ece(prob[:, k], outcome[:, k], num_bins) for k in range(prob.shape[1])])
        return {"ece": float(value), "brier": brier(labels, probs)}
    return {"ece": ece(prob, outcome, num_bins), "brier": brier(labels, probs)}


def _resampled_points(
    labels: np.ndarray, probs: np.ndarray, num_bins: int, draws: np.ndarray
) -> dict[str, np.ndarray]:
    """`_point` of every bootstrap resample (rows of `draws` [B, N]) at once (not multi-label).

    Per resample, ECE = sum over bins |sum(outcome) - sum(prob)| / N (the count-weighted gap
    of `ece`); one offset bincount bins all resamples together.
    """
    prob, outcome = _targets(labels, probs)
    if _kind(labels, probs) == "multiclass":
        one_hot = np.eye(probs.shape[1])[labels.astype(int)]
        squared = np.sum((probs - one_hot) ** 2, axis=1)
    else:
        squared = (prob - outcome) ** 2
    bins = np.clip((prob * num_bins).astype(int), 0, num_bins - 1)
    num_draws, n = draws.shape
    flat = (bins[draws] + num_bins * np.arange(num_draws)[:, None]).ravel()
    size = num_draws * num_bins
    sums = np.bincount(flat, weights=prob[draws].ravel(), minlength=size)
    hits = np.bincount(flat, weights=outcome[draws].ravel(), minlength=size)
    gaps = np.abs(hits - sums).reshape(num_draws, num_bins)
    return {"ece": gaps.sum(axis=1) / n, "brier": squared[draws].mean(axis=1)}


def summarize(
    labels: Any,
    probs: Any,
    *,
    class_names: Sequence[str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    num_bins: int = NUM_BINS,
) -> dict[str, Any]:
    """ECE and Brier with percentile-bootstrap CIs, the reliability table, per-finding values."""
    labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
    kind = _kind(labels, probs)
    names = list(class_names or [str(k) for k in range(probs.shape[1])])
    probability = {
        "binary": f"P({names[1]})",
        "multiclass": "top-label confidence",
        "multilabel": "each finding's probability (means over findings)",
    }[kind]
    result: dict[str, Any] = {"what": kind, "probability": probability, "num_bins": num_bins}
    result["level"] = level
    result.update(_point(labels, probs, num_bins))
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        indices = np.stack([rng.integers(0, len(labels), len(labels)) for _ in range(n_bootstrap)])
        if kind == "multilabel":
            draws = {"ece": [], "brier": []}
            for index in indices:
                point = _point(labels[index], probs[index], num_bins)
                for key in draws:
                    draws[key].append(point[key])
        else:
            draws = _resampled_points(labels, probs, num_bins, indices)
        tail = 100 * (1 - level) / 2
        for key, values in draws.items():
            low, high = np.percentile(values, [tail, 100 - tail])
            result[f"{key}_ci"] = [float(low), float(high)]
    prob, outcome = _targets(labels, probs)
    if prob.ndim == 2:
        result["per_class"] = {
            name: {
                "ece": ece(prob[:, k], outcome[:, k], num_bins),
                "brier": float(np.mean((prob[:, k] - outcome[:, k]) ** 2)),
            }
            for k, name in enumerate(names)
        }
        prob, outcome = prob.reshape(-1), outcome.reshape(-1)  # pooled diagram
    table = reliability(prob, outcome, num_bins)
    result["reliability"] = {key: _jsonable(value) for key, value in table.items()}
    return result


def _jsonable(values: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, np.float64)]


# --- temperature scaling ------------------------------------------------------------------------


def _logits(probs: np.ndarray, multilabel: bool) -> np.ndarray:
    probs = np.clip(np.asarray(probs, np.float64), EPS, 1 - EPS)
    return np.log(probs / (1 - probs)) if multilabel else np.log(probs)


def apply_temperature(probs: Any, temperature: float, *, multilabel: bool) -> np.ndarray:
    """Probabilities recomputed from logits / temperature (sigmoid or softmax)."""
    scaled = _logits(probs, multilabel) / temperature
    if multilabel:
        return 1.0 / (1.0 + np.exp(-scaled))
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def nll(labels: np.ndarray, probs: np.ndarray, *, multilabel: bool) -> float:
    """Mean negative log-likelihood (per image; multi-label: summed over findings)."""
    probs = np.clip(probs, EPS, 1 - EPS)
    if multilabel:
        terms = labels * np.log(probs) + (1 - labels) * np.log(1 - probs)
        return float(-np.mean(np.sum(terms, axis=1)))
    return float(-np.mean(np.log(probs[np.arange(len(labels)), labels.astype(int)])))


def fit_temperature(labels: Any, probs: Any, *, multilabel: bool) -> float:
    """The T in [0.05, 20] minimising validation NLL of probabilities at temperature T."""
    labels, probs = np.asarray(labels), np.asarray(probs, np.float64)

    def objective(log_t: float) -> float:
        scaled = apply_temperature(probs, float(np.exp(log_t)), multilabel=multilabel)
        return nll(labels, scaled, multilabel=multilabel)

    found = optimize.minimize_scalar(
        objective, bounds=(np.log(0.05), np.log(20.0)), method="bounded"
    )
    return float(np.exp(found.x))


def evaluate(
    val: Mapping[str, np.ndarray],
    test: Mapping[str, np.ndarray],
    *,
    class_names: Sequence[str],
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    figure_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Calibration of a classifier result: test as predicted, and after temperature scaling
    fitted on validation (`val`/`test`: {"labels", "probs"}). Optionally saves the diagram."""
    multilabel = np.asarray(test["labels"]).ndim == 2
    common = dict(class_names=class_names, n_bootstrap=n_bootstrap, seed=seed, level=level)
    temperature = fit_temperature(val["labels"], val["probs"], multilabel=multilabel)
    scaled = apply_temperature(test["probs"], temperature, multilabel=multilabel)
    result = {
        "val": summarize(val["labels"], val["probs"], **{**common, "n_bootstrap": 0}),
        "test": summarize(test["labels"], test["probs"], **common),
        "temperature": temperature,
        "temperature_fitted_on": "val",
        "test_temperature_scaled": summarize(test["labels"], scaled, **common),
    }
    if figure_path is not None:
        save_reliability_diagram(
            {
                "test": result["test"]["reliability"],
                f"test, T = {temperature:.2f}": result["test_temperature_scaled"]["reliability"],
                "val": result["val"]["reliability"],
            },
            figure_path,
            title=f"Reliability ({result['test']['what']})",
        )
        result["figure"] = os.path.basename(os.fspath(figure_path))
    return result


def save_reliability_diagram(
    tables: Mapping[str, Mapping[str, Sequence]], path: str | os.PathLike, title: str
) -> str:
    """Observed frequency vs mean probability per bin (marker area ~ count), plus the diagonal."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2, 4.2), dpi=120)
    FigureCanvasAgg(figure)
    axis = figure.add_subplot(1, 1, 1)
    axis.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
    for name, table in tables.items():
        confidence = np.array([np.nan if v is None else v for v in table["confidence"]], float)
        observed = np.array([np.nan if v is None else v for v in table["observed"]], float)
        counts = np.asarray(table["count"], float)
        used = counts > 0
        axis.plot(confidence[used], observed[used], marker="o", markersize=3, label=name)
    axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", title=title)
    axis.set_ylabel("observed frequency")
    axis.legend(loc="upper left", fontsize=7)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    return os.fspath(path)


def markdown(calibration: Mapping[str, Any]) -> str:
    """A short Markdown section: ECE / Brier with CIs, before and after temperature scaling."""

    def cell(result, key):
        low, high = result.get(f"{key}_ci", (None, None))
        ci = f" [{low:.3f}, {high:.3f}]" if low is not None else ""
        return f"{result[key]:.3f}{ci}"

    rows = [
        ("test", calibration["test"]),
        (
            f"test, temperature {calibration['temperature']:.2f}",
            calibration["test_temperature_scaled"],
        ),
        ("val", calibration["val"]),
    ]
    lines = [
        "## Calibration",
        "",
        f"Calibrated probability: {calibration['test']['probability']}; expected calibration "
        f"error over {calibration['test']['num_bins']} equal-width bins, Brier score, "
        f"{100 * calibration['test']['level']:.0f} % bootstrap CIs over test images; "
        "temperature fitted on validation "
        "(cxrjax/metrics/calibration.py).",
        "",
        "| split | ECE | Brier |",
        "| --- | --- | --- |",
        *[f"| {name} | {cell(r, 'ece')} | {cell(r, 'brier')} |" for name, r in rows],
    ]
    if calibration.get("figure"):
        lines += ["", f"![Reliability diagram]({calibration['figure']})"]
    return "\n".join(lines)
