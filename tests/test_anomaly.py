"""Anomaly interface without trained generators: the izi_f loss by hand, f_D is D's
penultimate layer, scores per image, and `evaluate` (sklearn's AUC, threshold from val only)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from cxrjax import anomaly
from cxrjax.data import sources
from cxrjax.metrics import classification as cls_metrics
from cxrjax.models import encoder as encoder_lib
from cxrjax.models import layers, pggan
from cxrjax.train import anomaly as anomaly_train

SPEC = sources.DatasetSpec("toy", ("normal", "pneumonia"), resolution=8)


@pytest.fixture(scope="module")
def tiny_models():
    """Conditional tiny G/D at 8x8 and a tiny encoder, random parameters (no training)."""
    generator = pggan.GeneratorTiny(max_resolution=8, num_classes=2)
    discriminator = pggan.DiscriminatorTiny(max_resolution=8, num_classes=2)
    encoder = encoder_lib.EncoderTiny(latent_dim=generator.latent_dim)

    @jax.jit  # one compile instead of hundreds of eager ops
    def init(key):
        keys = jax.random.split(key, 3)
        g = generator.init(keys[0], jnp.zeros((1, 16)), jnp.zeros((1,), jnp.int32), resolution=4)
        d = discriminator.init(keys[1], jnp.zeros((1, 4, 4, 1)), resolution=4)
        e = encoder.init(keys[2], jnp.zeros((1, 8, 8, 1)))
        return g["params"], d["params"], e["params"]

    g, d, e = init(jax.random.PRNGKey(0))
    images = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 1), minval=-1, maxval=1)
    return generator, discriminator, encoder, g, d, e, images


def _leaky(v):
    return np.where(v > 0, v, 0.2 * v)


def _features_by_hand(discriminator, d_params, images):
    """Penultimate activations, one image per D call, read from all captured intermediates."""
    capture = jax.jit(
        lambda image: discriminator.apply(
            {"params": d_params},
            image[None],
            resolution=8,
            capture_intermediates=True,
            mutable=["intermediates"],
        )[1]["intermediates"]["block_4x4"]["dense0"]["__call__"][0]
    )
    return np.concatenate([_leaky(np.asarray(capture(image))) for image in np.asarray(images)])


def test_izif_loss_matches_hand_computation(tiny_models):
    generator, discriminator, encoder, g, d, e, images = tiny_models
    kappa = 0.7
    loss_fn = anomaly_train.make_loss_fn(
        encoder, generator, discriminator, resolution=8, kappa=kappa, normal_label=1
    )
    loss, metrics = jax.jit(loss_fn)(e, {"generator": g, "discriminator": d}, images)

    z = np.asarray(jax.jit(encoder.apply)({"params": e}, images))
    np.testing.assert_allclose(np.sum(z**2, axis=1), 16.0, rtol=1e-4)  # sphere of radius sqrt(d)
    labels = jnp.ones((4,), jnp.int32)  # the normal class (index 1 here) conditions G
    generate = jax.jit(lambda z: generator.apply({"params": g}, z, labels, resolution=8))
    recon = np.asarray(generate(jnp.asarray(z)))
    x = np.asarray(images)
    residual = np.mean((x - recon) ** 2)
    f_x = _features_by_hand(discriminator, d, x)
    f_r = _features_by_hand(discriminator, d, recon)
    feature = np.mean((f_x - f_r) ** 2)
    assert f_x.shape == (4, 16)
    assert float(metrics["residual"]) == pytest.approx(residual, rel=1e-4)
    assert float(metrics["feature"]) == pytest.approx(feature, rel=1e-4)
    assert float(loss) == pytest.approx(residual + kappa * feature, rel=1e-4)


def test_features_are_the_penultimate_layer(tiny_models):
    _, discriminator, _, _, d, _, images = tiny_models
    features_fn = jax.jit(anomaly_train.discriminator_features, static_argnums=(0, 3))
    features = np.asarray(features_fn(discriminator, d, images, 8))
    dense1 = d["block_4x4"]["dense1"]
    scale = layers.he_scale(features.shape[1], gain=1.0)  # equalized lr, D's last layer
    logits = features @ (np.asarray(dense1["kernel"]) * scale) + np.asarray(dense1["bias"])
    critic = jax.jit(lambda x: discriminator.apply({"params": d}, x, resolution=8))
    for k in range(4):  # D on one image at a time: its critic score and class logits
        score, cls = critic(images[k : k + 1])
        np.testing.assert_allclose(logits[k, 0], score[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(logits[k, 1:], cls[0], rtol=1e-4, atol=1e-5)


def test_fanogan_scores_per_image_and_deterministic(tiny_models):
    generator, discriminator, encoder, g, d, e, images = tiny_models
    run = anomaly.GeneratorRun(
        "pggan",
        "-",
        None,
        SPEC,
        0,
        8,
        {"generator": generator, "discriminator": discriminator},
        {"generator": g, "discriminator": d},
    )
    scorer = anomaly.FAnoGANScorer(run, encoder, e, normal_class="normal", kappa=0.5)
    scores, maps = scorer(images)
    assert scores.shape == (4,) and maps.shape == (4, 8, 8)
    again, _ = scorer(images)
    np.testing.assert_array_equal(scores, again)
    # An image's score does not depend on what it is batched with (f_D per image).
    alone, _ = scorer(images[2:3])
    np.testing.assert_allclose(alone[0], scores[2], rtol=1e-5)
    out = scorer.outputs(images)
    np.testing.assert_allclose(
        out["score"], out["terms/residual"] + 0.5 * out["terms/feature"], rtol=1e-6
    )
    np.testing.assert_allclose(
        maps, np.abs(np.asarray(images) - np.asarray(out["reconstruction"]))[..., 0], rtol=1e-6
    )


def test_encoder_widths_and_outputs():
    assert encoder_lib.widths(32, 32, 128) == [32, 64, 128, 128]
    assert encoder_lib.widths(4, 8, 16) == [8]
    with pytest.raises(ValueError, match="power of two"):
        encoder_lib.widths(24, 8, 16)
    x = jnp.ones((2, 16, 16, 1))
    for output in ("tanh", "none"):
        enc = encoder_lib.EncoderTiny(latent_dim=8, output=output)
        shape = jax.eval_shape(lambda x, enc=enc: enc.init_with_output(jax.random.PRNGKey(0), x), x)
        assert shape[0].shape == (2, 8)


def test_anomaly_labels_multiclass_and_no_finding():
    y = anomaly.anomaly_labels(np.array([0, 1, 2, 0]), ("normal", "bacteria", "virus"), "normal")
    np.testing.assert_array_equal(y, [0, 1, 1, 0])
    multi_hot = np.array([[0, 0], [1, 0], [0, 0], [1, 1]], np.float32)
    y = anomaly.anomaly_labels(multi_hot, ("Atelectasis", "Effusion"), "No Finding")
    np.testing.assert_array_equal(y, [0, 1, 0, 1])
    with pytest.raises(anomaly.config_lib.ConfigError, match="normal_class"):
        anomaly.check_normal_class(SPEC, "cardiomegaly")


class BrightnessScorer(anomaly.Scorer):
    """A stand-in model: score = mean pixel value (no generator), map = |x|."""

    method = "brightness"
    resolution = 8
    info = {"score": "mean pixel"}

    def outputs(self, images, labels=None, indices=None):
        x = np.asarray(images, np.float32)
        return {"score": x.mean(axis=(1, 2, 3)), "map": np.abs(x[..., 0])}


def _split(rng, n, shift):
    """Normals darker than abnormals by `shift` grey levels (overlapping distributions)."""
    labels = rng.integers(0, 2, n)
    level = 100 + shift * labels + rng.normal(0, 20, n)
    images = np.clip(level[:, None, None] + rng.normal(0, 5, (n, 8, 8)), 0, 255).astype(np.uint8)
    return sources.ArraySource(images, labels)


def test_evaluate_matches_sklearn_and_takes_threshold_from_val(tmp_path):
    rng = np.random.default_rng(0)
    # Validation and test differ (the test abnormals are brighter), so their best thresholds
    # differ: the reported threshold must be validation's.
    splits = {"val": _split(rng, 60, 25), "test": _split(rng, 90, 45)}
    results = anomaly.evaluate(
        BrightnessScorer(),
        splits,
        SPEC,
        "normal",
        str(tmp_path),
        batch_size=16,
        n_bootstrap=100,
        num_examples=2,
    )
    manual = {}
    for split, source in splits.items():
        x = np.stack([source[i]["image"] for i in range(len(source))]).astype(np.float32)
        s = (x / 255.0 * 2.0 - 1.0).mean(axis=(1, 2))  # the pipeline's [-1, 1] scaling
        y = np.array([source[i]["label"] for i in range(len(source))])
        manual[split] = (y, s)
        assert results[split]["auc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-9)
        assert results[split]["pr_auc"] == pytest.approx(
            skm.average_precision_score(y, s), abs=1e-9
        )
    val_thr = cls_metrics.select_threshold(*manual["val"])
    test_thr = cls_metrics.select_threshold(*manual["test"])
    assert val_thr != pytest.approx(test_thr)
    assert results["threshold"] == pytest.approx(val_thr) and results["threshold_split"] == "val"
    y, s = manual["test"]
    pred = s >= val_thr
    assert results["test"]["accuracy"] == pytest.approx(np.mean(pred == y))
    assert results["test"]["recall"] == pytest.approx(pred[y == 1].mean())
    lo, hi = results["test"]["auc_ci"]
    assert lo <= results["test"]["auc"] <= hi
    assert results["dataset"]["test_counts"] == {
        "normal": int((y == 0).sum()),
        "abnormal": int((y == 1).sum()),
    }
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test"]["auc"] == results["test"]["auc"]
    for name in ("results.md", "roc.png", "residuals.png", "val_scores.npz", "test_scores.npz"):
        assert (tmp_path / name).stat().st_size > 0
    assert len(results["examples"]["test_indices"]) == 4  # 2 normal + 2 abnormal
    assert "| test (90" in (tmp_path / "results.md").read_text()
