"""Sanity ordering on real data: held-out real images must beat degraded "synthetic" sets.

Reference: the shipped PneumoniaMNIST train split (2428 images). "Good synthetic": the held-out
test split (468). Degraded sets from the same test images: Gaussian noise, heavy blur, mode
collapse (64 copies of one image) and the other class's images. Features: `pixels:16`.

Every headline metric must rank the good set best, in its documented direction, except these
blind spots of pixel features, found here and explained (they are asserted, so the README's
account stays true):

  noise / recall      noisy samples are far from each other, so their k-NN balls are huge and
                      swallow the real samples: recall rises (0.99 vs 0.84). This is the flaw
                      of Kynkäänniemi recall that coverage (Naeem et al. 2020) fixes.
  blur / precision, density, coverage
                      a blurred image is a local average: it lies near the dense middle of the
                      real pixel distribution, inside more real balls than real images are
                      (precision 0.97, density 2.3, coverage 0.565 vs 0.89, 1.09, 0.551).
                      Fidelity in pixel space rewards smoothness; learned features
                      (cxr:, inception:) are needed to call blur unrealistic. Recall (0.16)
                      and every other metric do catch it.
  collapse / precision, density
                      the repeated image (test image 0) is itself a held-out real image, in a
                      dense region: it lies inside 10 real balls, so precision is 1.0 and
                      density 10 / k = 2.0 (vs 0.89 and 1.09). Both measure fidelity, not
                      diversity (an atypical repeated image would score lower); recall (0),
                      coverage (0.0004) and every distribution and cluster metric catch it.
  swap (labels of the other class)
                      the image set is the good set itself, so every class-blind metric ties;
                      the per-class metrics and the pooled class structure catch it. k-means
                      ARI / NMI are invariant to renaming classes and cannot.
"""

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import threadpoolctl

from cxrjax import features, quality
from cxrjax.metrics import generative

HIGHER = ("precision", "recall", "density", "coverage", "davies_bouldin")
LOWER = ("fid", "kid", "calinski_harabasz")
KEYS = (*LOWER, *HIGHER, "silhouette")
KNOWN_BLIND_SPOTS = {
    "noise": {"recall"},
    "blur": {"precision", "density", "coverage"},
    "collapse": {"precision", "density"},
}
SETTINGS = dict(k=5, kid_subset_size=200, kid_subsets=10, seed=0)


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """scipy's sqrtm and k-means oversubscribe the 2 shared cores badly (sqrtm of 256 x 256:
    ~1.5 s with OpenBLAS threads vs 0.04 s with one, measured under load); one thread here."""
    with threadpoolctl.threadpool_limits(limits=1):
        yield


def better(key, good, bad):
    """True when `good` is strictly closer to the real data than `bad` for metric `key`."""
    if key == "silhouette":  # real vs synthetic: inseparable sets score ~0
        return abs(good) < abs(bad)
    return good > bad if key in HIGHER else good < bad


def load(data_dir, split):
    return quality.load_dataset_split(f"pneumonia_mnist:{split}", data_dir=data_dir)


@pytest.fixture(scope="module")
def data(shipped_data_dir):
    train, test = load(shipped_data_dir, "train"), load(shipped_data_dir, "test")
    rng = np.random.default_rng(0)
    images = test.images.astype(np.float64)
    degraded = {
        "noise": np.clip(images + rng.normal(0.0, 0.25 * 255, images.shape), 0, 255),
        "blur": np.stack([scipy.ndimage.gaussian_filter(x, sigma=2.0) for x in images]),
        "collapse": np.repeat(images[:1], 64, axis=0),
    }
    degraded = {name: np.round(x).astype(np.uint8) for name, x in degraded.items()}
    extractor = features.pixels_extractor(16)
    feats = {
        name: features.extract(extractor, x, batch_size=512)
        for name, x in {"train": train.images, "good": test.images, **degraded}.items()
    }
    labels = {"good": test.labels, "collapse": np.repeat(test.labels[:1], 64)}
    labels.update(noise=test.labels, blur=test.labels)
    return train, test, feats, labels


@pytest.fixture(scope="module")
def scores(data):
    train, _, feats, _ = data
    with warnings.catch_warnings():
        # 64 copies have a singular covariance: FID warns and regularises, as it should.
        warnings.simplefilter("ignore", generative.MetricWarning)
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return {
            name: quality.distribution_metrics(feats["train"], feats[name], **SETTINGS)
            for name in ("good", "noise", "blur", "collapse")
        }


@pytest.mark.parametrize("degradation", ["noise", "blur", "collapse"])
def test_every_metric_ranks_held_out_real_images_above_a_degradation(scores, degradation):
    good, bad = scores["good"], scores[degradation]
    blind = KNOWN_BLIND_SPOTS[degradation]
    wrong = [key for key in KEYS if key not in blind and not better(key, good[key], bad[key])]
    assert not wrong, {key: (good[key], bad[key]) for key in wrong}
    # The documented blind spots are real (if one starts ranking correctly, update the docs).
    ranked_anyway = [key for key in blind if better(key, good[key], bad[key])]
    assert not ranked_anyway, {key: (good[key], bad[key]) for key in ranked_anyway}


def test_other_class_images_are_caught_per_class_and_by_class_structure(data):
    train, test, feats, _ = data
    names = train.class_names
    swapped = 1 - test.labels
    full = dict(class_names=names, **SETTINGS)
    good = quality.compute_metrics(feats["train"], train.labels, feats["good"], test.labels, **full)
    bad = quality.compute_metrics(feats["train"], train.labels, feats["good"], swapped, **full)
    for name in names:
        g, b = good["per_class"][name], bad["per_class"][name]
        wrong = [key for key in KEYS if not better(key, g[key], b[key])]
        assert not wrong, (name, {key: (g[key], b[key]) for key in wrong})
    # Pooled by class, the good set keeps the real classes apart better.
    pooled = "pooled/silhouette"
    assert good["class_structure"][pooled] > bad["class_structure"][pooled]
    assert (
        good["class_structure"]["pooled/calinski_harabasz"]
        > (bad["class_structure"]["pooled/calinski_harabasz"])
    )
    # Class-blind metrics tie (the same images), and k-means agreement cannot see renaming.
    for key in KEYS:
        assert good[key] == bad[key] or (math.isnan(good[key]) and math.isnan(bad[key]))
    assert good["kmeans_ari"] == pytest.approx(bad["kmeans_ari"])
    assert good["memorisation_rate"] is None  # no training set given


def test_copied_training_images_are_flagged_as_memorised(data):
    train, test, feats, _ = data
    copies = feats["train"][:64]
    good = quality.compute_metrics(
        feats["train"],
        train.labels,
        feats["good"],
        test.labels,
        feats["train"],
        class_names=train.class_names,
        per_class=False,
        **SETTINGS,
    )
    copied = quality.compute_metrics(
        feats["train"],
        train.labels,
        copies,
        train.labels[:64],
        feats["train"],
        class_names=train.class_names,
        per_class=False,
        **SETTINGS,
    )
    assert good["memorisation_rate"] < 0.05  # held-out images are not copies
    assert copied["memorisation_rate"] == 1.0
    pairs = copied["memorisation"]["closest_pairs"]
    assert len(pairs) == 16 and all(p["distance"] == 0.0 for p in pairs)
    for pair in pairs:
        np.testing.assert_array_equal(feats["train"][pair["train"]], copies[pair["synthetic"]])
