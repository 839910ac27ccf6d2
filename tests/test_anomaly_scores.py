"""Anomaly scores that mean what they say (#13): the feature-space score by hand, both spaces in
results, t* chosen on validation only (test scored once), and below-chance warnings without
flipping. Fake scorers on 8x8 toy images: no generator is trained here."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from cxrjax import anomaly, features
from cxrjax.data import sources

SPEC = sources.DatasetSpec("toy", ("normal", "pneumonia"), resolution=8)


class ShiftScorer(anomaly.Scorer):
    """Reconstruction = 0.5 x; pixel score = sign * mean(x) + noise * N(0, 1) keyed by record."""

    method = "toy"
    resolution = 8

    def __init__(self, sign=1.0, noise=0.0):
        self.sign, self.noise = float(sign), float(noise)
        self.info = {"method": "toy", "score": f"{sign} * mean(x)", "noise": noise}

    def outputs(self, images, labels=None, indices=None):
        x = np.asarray(images, np.float32)
        idx = np.arange(len(x)) if indices is None else np.asarray(indices)
        jitter = np.array([np.random.default_rng(abs(int(i))).normal() for i in idx], np.float32)
        return {
            "score": self.sign * x.mean(axis=(1, 2, 3)) + self.noise * jitter,
            "map": np.abs(x[..., 0]),
            "reconstruction": 0.5 * x,
        }


def _split(rng, n, shift):
    """Normals darker than abnormals by `shift` grey levels (overlapping distributions)."""
    labels = rng.integers(0, 2, n)
    level = 100 + shift * labels + rng.normal(0, 20, n)
    images = np.clip(level[:, None, None] + rng.normal(0, 5, (n, 8, 8)), 0, 255).astype(np.uint8)
    return sources.ArraySource(images, labels)


@pytest.fixture(scope="module")
def splits():
    rng = np.random.default_rng(0)
    return {"val": _split(rng, 48, 25), "test": _split(rng, 64, 25)}


def _arrays(source):
    x = np.stack([source[i]["image"] for i in range(len(source))]).astype(np.float32)
    y = np.array([source[i]["label"] for i in range(len(source))])
    return x / 255.0 * 2.0 - 1.0, y  # the pipeline's [-1, 1] scaling, [N, 8, 8]


def _linear_extractor(dim=3):
    """phi(x) = flatten(x in [0, 1]) @ W: a fake extractor with a hand-computable output."""
    weights = np.random.default_rng(1).normal(size=(64, dim)).astype(np.float32)
    return features.Extractor(
        spec="fake",
        kind="fake",
        dim=dim,
        apply_fn=lambda params, x: x.reshape(x.shape[0], -1) @ params,
        params=jnp.asarray(weights),
        fingerprint="fake",
    ), weights


def test_feature_score_is_the_squared_feature_distance_over_dim():
    extractor, weights = _linear_extractor()
    scorer = anomaly.FeatureSpaceScorer(ShiftScorer(), extractor)
    images = np.random.default_rng(2).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
    out = scorer.outputs(images)
    phi = lambda v: ((v + 1) / 2).reshape(4, -1) @ weights
    expected = np.sum((phi(images) - phi(0.5 * images)) ** 2, axis=1) / 3
    np.testing.assert_allclose(np.asarray(out["score/features"]), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["score"]), expected, rtol=1e-5)  # primary
    np.testing.assert_allclose(out["score/pixels"], images.mean(axis=(1, 2, 3)), rtol=1e-6)
    # The pixels extractor at the image size: mean over pixels of the [0, 1] squared residual.
    pixels = anomaly.FeatureSpaceScorer(ShiftScorer(), features.pixels_extractor(8))
    by_hand = np.mean(((images + 1) / 2 - (0.5 * images + 1) / 2) ** 2, axis=(1, 2, 3))
    got = np.asarray(pixels.outputs(images)["score/features"])
    np.testing.assert_allclose(got, by_hand, rtol=1e-5)


def test_evaluate_reports_both_spaces_and_primary_on_top(splits, tmp_path):
    extractor, weights = _linear_extractor()
    scorer = anomaly.FeatureSpaceScorer(ShiftScorer(noise=0.05), extractor, primary="pixels")
    results = anomaly.evaluate(
        scorer, splits, SPEC, "normal", str(tmp_path), batch_size=16, n_bootstrap=20
    )
    assert results["primary_score"] == "pixels" and set(results["scores"]) == {"pixels", "features"}
    assert results["test"] == results["scores"]["pixels"]["test"]
    assert results["threshold"] == results["scores"]["pixels"]["threshold"]
    x, y = _arrays(splits["test"])
    phi = lambda v: ((v + 1) / 2).reshape(len(v), -1) @ weights
    feature = np.sum((phi(x) - phi(0.5 * x)) ** 2, axis=1) / 3
    got = results["scores"]["features"]["test"]["auc"]
    assert got == pytest.approx(skm.roc_auc_score(y, feature), abs=1e-6)
    saved = np.load(tmp_path / "test_scores.npz")
    np.testing.assert_allclose(saved["score_features"], feature, rtol=1e-4)
    np.testing.assert_array_equal(saved["score"], saved["score_pixels"])
    md = (tmp_path / "results.md").read_text()
    assert "classifier feature space" in md and "pixel space (primary" in md


def test_below_chance_score_warns_and_is_not_flipped(splits, tmp_path):
    # Higher = more anomalous by construction; this score ranks abnormals (brighter) lower.
    results = anomaly.evaluate(
        ShiftScorer(sign=-1.0), splits, SPEC, "normal", str(tmp_path), batch_size=16,
        n_bootstrap=0, num_examples=0,
    )  # fmt: skip
    x, y = _arrays(splits["val"])
    assert results["val"]["auc"] < 0.5
    assert results["val"]["auc"] == pytest.approx(skm.roc_auc_score(y, -x.mean(axis=(1, 2))))
    (warning,) = results["warnings"]
    assert "below chance on validation" in warning and "not flipped" in warning
    assert json.loads((tmp_path / "results.json").read_text())["warnings"] == [warning]
    assert "**Warning:**" in (tmp_path / "results.md").read_text()
    good = anomaly.evaluate(
        ShiftScorer(), splits, SPEC, "normal", str(tmp_path / "good"), batch_size=16,
        n_bootstrap=0, num_examples=0,
    )  # fmt: skip
    assert good["warnings"] == [] and good["val"]["auc"] > 0.5


def test_t_star_grid_picks_best_validation_auc_and_scores_test_once(splits, tmp_path, monkeypatch):
    # t* = 100: noisy; 200: clean (best); 300: below chance. Test must see only t* = 200.
    made = {100: ShiftScorer(noise=0.5), 200: ShiftScorer(noise=0.0), 300: ShiftScorer(-1.0)}
    calls = []
    original = anomaly.score_split

    def spy(scorer, source, spec, **options):
        t = next(t for t, s in made.items() if s is scorer)
        calls.append((t, options["name"]))
        return original(scorer, source, spec, **options)

    monkeypatch.setattr(anomaly, "score_split", spy)
    selection = anomaly.select_on_validation(
        {t: (lambda t=t: made[t]) for t in made},
        splits["val"],
        SPEC,
        "normal",
        name="t_star",
        batch_size=16,
    )
    x, y = _arrays(splits["val"])
    expected = {t: skm.roc_auc_score(y, original(s, splits["val"], SPEC, batch_size=16)["score"])
                for t, s in made.items()}  # fmt: skip
    assert selection.chosen == 200 == max(expected, key=expected.get)
    for t, auc in expected.items():
        assert selection.record["val_auc"][str(t)]["pixels"] == pytest.approx(auc)
    results = anomaly.evaluate(
        None, splits, SPEC, "normal", str(tmp_path), batch_size=16, n_bootstrap=0,
        num_examples=0, selection=selection,
    )  # fmt: skip
    assert [c for c in calls if "test" in c[1]] == [(200, "test")]
    assert len([c for c in calls if c[1].startswith("val")]) == 3  # each t* once, on val
    record = results["t_star_selection"]
    assert record["chosen"] == 200 and record["grid"] == [100, 200, 300]
    assert record["split"] == "val" and record["space"] == "pixels"
    assert results["val"]["auc"] == pytest.approx(expected[200])
    saved = np.load(tmp_path / "val_scores.npz")
    assert saved["grid_score_pixels"].shape == (3, len(y))
    np.testing.assert_array_equal(saved["grid_t_star"], [100, 200, 300])
    assert "t* chosen on validation = 200" in (tmp_path / "results.md").read_text()
