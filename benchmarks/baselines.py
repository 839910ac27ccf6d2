"""Non-deep baselines on the shipped PneumoniaMNIST subset: logistic regression and random forest
on raw pixels, tuned on nothing, fit on train, scored on test (ROC-AUC, accuracy at 0.5).

    python -m benchmarks.baselines

A floor for the DenseNet numbers in README.md; prints a small table.
"""

from __future__ import annotations

import importlib.resources

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score


def load(split: str, arrays) -> tuple[np.ndarray, np.ndarray]:
    images = arrays[f"{split}_images"].reshape(len(arrays[f"{split}_images"]), -1) / 255.0
    return images.astype(np.float32), arrays[f"{split}_labels"].reshape(-1)


def main() -> None:
    path = importlib.resources.files("cxrjax.data.resources") / "pneumoniamnist_subset_28.npz"
    with importlib.resources.as_file(path) as file, np.load(file) as arrays:
        x_train, y_train = load("train", arrays)
        x_test, y_test = load("test", arrays)
    models = {
        "logistic regression (pixels)": LogisticRegression(max_iter=2000, C=1.0),
        "random forest (pixels, 300 trees)": RandomForestClassifier(
            n_estimators=300, random_state=0, n_jobs=-1
        ),
    }
    print("| model | test ROC-AUC | test accuracy |\n| --- | --- | --- |")
    for name, model in models.items():
        model.fit(x_train, y_train)
        scores = model.predict_proba(x_test)[:, 1]
        auc = roc_auc_score(y_test, scores)
        accuracy = accuracy_score(y_test, scores >= 0.5)
        print(f"| {name} | {auc:.3f} | {accuracy:.3f} |")


if __name__ == "__main__":
    main()
