"""Tests for cxrjax.report: Markdown format and valid PNGs (Agg, no display)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxrjax import report
from cxrjax.metrics import classification


def _png(path):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        assert im.width > 0 and im.height > 0
        return np.asarray(im)


def _binary(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, 1 / (1 + np.exp(-(y + rng.normal(size=n))))


def test_markdown_table_formats_cis_aggregates_and_missing():
    rows = [
        {"model": "densenet|gan", "auc": 0.95312, "auc_ci": [0.9311, 0.9704], "n": 624},
        {"model": "baseline", "auc": None, "n": 624, "macro": {"f1": 0.5}},
        {"model": "3 seeds", "auc": {"mean": 0.9, "std": 0.0123}, "n": 3},
    ]
    table = report.markdown_table(
        rows, {"model": "Model", "auc": "AUC", "n": "N", "macro.f1": "F1"}
    )
    assert table == (
        "| Model | AUC | N | F1 |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| densenet\\|gan | 0.953 [0.931, 0.970] | 624 | n/a |\n"
        "| baseline | n/a | 624 | 0.500 |\n"
        "| 3 seeds | 0.900 ± 0.012 | 3 | n/a |\n"
    )
    assert report.markdown_table(rows[:1], ["auc"], float_fmt=".2f").splitlines()[2] == (
        "| 0.95 [0.93, 0.97] |"
    )


def test_markdown_table_of_evaluate_and_aggregate_outputs():
    y, s = _binary()
    runs = [
        classification.evaluate(y, s + 0.01 * k, threshold=0.5, n_bootstrap=50) for k in range(3)
    ]
    table = report.markdown_table([dict(runs[0], model="seed0")], ["model", "auc", "f1"])
    lo, hi = runs[0]["auc_ci"]
    assert f"| seed0 | {runs[0]['auc']:.3f} [{lo:.3f}, {hi:.3f}] |" in table
    agg = report.markdown_table([classification.aggregate_seeds(runs)], ["auc"])
    assert "±" in agg.splitlines()[2]


def test_roc_and_pr_figures_show_auc_in_legend(tmp_path):
    y, s = _binary()
    y2, s2 = _binary(seed=1)
    curves = {
        "model": (y, s),
        "other": (y2, np.stack([1 - s2, s2], 1)),
        "empty": (np.zeros(5), np.ones(5)),
    }
    legend = [t.get_text() for t in report.roc_figure(curves).axes[0].get_legend().get_texts()]
    auc = classification.evaluate(y, s, n_bootstrap=0)["auc"]
    assert legend[0] == f"model (AUC = {auc:.3f})"
    assert legend[2] == "empty (AUC n/a: one class)"
    pr_legend = [t.get_text() for t in report.pr_figure(curves).axes[0].get_legend().get_texts()]
    assert pr_legend[0].startswith("model (AP = ")
    _png(report.save_roc_curves(curves, tmp_path / "roc.png", title="test"))
    _png(report.save_pr_curves(curves, tmp_path / "sub" / "pr.png"))


@pytest.mark.parametrize("normalize", [False, True])
def test_save_confusion_matrix(tmp_path, normalize):
    cm = np.array([[50, 3, 0], [4, 40, 6], [0, 0, 0]])
    _png(
        report.save_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "cm.png", normalize=normalize)
    )
    with pytest.raises(ValueError, match="classes"):
        report.save_confusion_matrix(cm, ["a", "b"], tmp_path / "bad.png")


def test_save_image_grid_exact_pixels(tmp_path):
    images = np.full((5, 8, 8, 1), -1.0)
    images[1] = 1.0  # generator range [-1, 1] -> 0 / 255
    pixels = _png(report.save_image_grid(images, tmp_path / "grid.png", nrow=3, padding=2))
    assert pixels.shape == (2 * 8 + 3 * 2, 3 * 8 + 4 * 2)
    assert pixels[2:10, 12:20].min() == 255  # image 1: row 0, column 1
    assert pixels[2:10, 2:10].max() == 0
    raw = np.arange(4 * 6 * 6, dtype=np.uint8).reshape(4, 6, 6)
    out = _png(report.save_image_grid(raw, tmp_path / "u8.png", nrow=4, padding=0))
    np.testing.assert_array_equal(out, np.concatenate(list(raw), axis=1))  # uint8 untouched


def test_save_image_grid_with_labels(tmp_path):
    images = np.random.default_rng(0).random((3, 16, 16))
    _png(report.save_image_grid(images, tmp_path / "labelled.png", nrow=2, labels=["a", "b", "c"]))
    with pytest.raises(ValueError, match="labels"):
        report.save_image_grid(images, tmp_path / "x.png", labels=["a"])


def test_save_line_plot(tmp_path):
    series = {"train/loss": [1.0, 0.5, 0.25], "eval/loss": ([0, 2], [0.9, 0.4])}
    _png(report.save_line_plot(series, tmp_path / "loss.png", title="loss", log_y=True))
    with pytest.raises(ValueError, match="equal-length"):
        report.save_line_plot({"bad": ([0, 1, 2], [1.0])}, tmp_path / "bad.png")
