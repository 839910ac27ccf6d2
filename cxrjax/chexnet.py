"""CheXNet (Rajpurkar et al. 2017) as published, to compare a run's per-finding AUCs with.

The recipe (configs/classifier.py:chexnet): DenseNet121 initialised from ImageNet weights, final
layer replaced by 14 sigmoid outputs; images downscaled to 224 x 224 and normalised with the
ImageNet mean/std; random horizontal flips; Adam (beta1 0.9, beta2 0.999), lr 1e-3, batch 16,
learning rate divided by 10 each time the validation loss plateaus after an epoch; per-finding
weighted binary cross-entropy, w+ = |N| / (|P| + |N|), w- = |P| / (|P| + |N|) from the training
set; the checkpoint with the lowest validation loss is kept.

PUBLISHED_AUC: Table 2 of arXiv:1711.05225v3 (CheXNet column). The paper used its own random
patient split (70/10/20 of ChestX-ray14); the official test list used by nih_chest_xray14 here
is a different, harder test set, so the comparison is indicative, not like-for-like.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PAPER = "Rajpurkar et al. 2017, CheXNet (arXiv:1711.05225v3, Table 2)"
PUBLISHED_AUC = {
    "Atelectasis": 0.8094,
    "Cardiomegaly": 0.9248,
    "Effusion": 0.8638,
    "Infiltration": 0.7345,
    "Mass": 0.8676,
    "Nodule": 0.7802,
    "Pneumonia": 0.7680,
    "Pneumothorax": 0.8887,
    "Consolidation": 0.7901,
    "Edema": 0.8878,
    "Emphysema": 0.9371,
    "Fibrosis": 0.8047,
    "Pleural_Thickening": 0.8062,
    "Hernia": 0.9164,
}
PUBLISHED_MEAN_AUC = sum(PUBLISHED_AUC.values()) / len(PUBLISHED_AUC)  # 0.8414


def applies(class_names) -> bool:
    """Whether a result's classes are the 14 ChestX-ray14 findings (any order)."""
    return set(class_names) == set(PUBLISHED_AUC)


def comparison(result: Mapping[str, Any]) -> dict[str, Any]:
    """Per-finding AUC (with CI when present) of a multi-label result beside the paper's, and
    the means over the 14 findings."""
    rows = []
    for name, published in PUBLISHED_AUC.items():
        own = result["per_class"][name]
        rows.append(
            {
                "finding": name,
                "auc": own.get("auc"),
                "auc_ci": own.get("auc_ci"),
                "paper_auc": published,
                "difference": None if own.get("auc") is None else own["auc"] - published,
            }
        )
    aucs = [row["auc"] for row in rows if row["auc"] is not None]
    mean = sum(aucs) / len(aucs) if len(aucs) == len(rows) else None
    return {
        "paper": PAPER,
        "rows": rows,
        "mean_auc": mean,
        "paper_mean_auc": PUBLISHED_MEAN_AUC,
        "note": "the paper's test set is its own random patient split, not the official list",
    }


def markdown(table: Mapping[str, Any]) -> str:
    """The comparison as a Markdown section."""

    def fmt(value, ci=None):
        if value is None:
            return "n/a"
        text = f"{value:.3f}"
        return text + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    lines = [
        "## Per-finding test AUC vs CheXNet",
        "",
        f"{table['paper']}; {table['note']}.",
        "",
        "| finding | this run | paper | difference |",
        "| --- | --- | --- | --- |",
    ]
    for row in table["rows"]:
        diff = "n/a" if row["difference"] is None else f"{row['difference']:+.3f}"
        lines.append(
            f"| {row['finding']} | {fmt(row['auc'], row['auc_ci'])} | "
            f"{row['paper_auc']:.3f} | {diff} |"
        )
    mean = table["mean_auc"]
    diff = "n/a" if mean is None else f"{mean - table['paper_mean_auc']:+.3f}"
    lines.append(f"| **mean** | {fmt(mean)} | {table['paper_mean_auc']:.3f} | {diff} |")
    return "\n".join(lines)
