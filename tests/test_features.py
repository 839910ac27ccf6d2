"""Feature extractors: spec errors before compute, pixels, batching over devices, the cache, the
classifier (cxr:) extractor on tiny inputs (inception: runs in tests/models/test_inception.py)."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import classifier as classifier_configs
from cxrjax import checkpoint as checkpoint_lib
from cxrjax import config as config_lib
from cxrjax import features, parallel
from cxrjax.config import ConfigError
from cxrjax.train import classifier, optim


def images_u8(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("vgg", ConfigError, "unknown feature extractor"),
        ("pixels:0", ConfigError, "positive integer"),
        ("cxr", ConfigError, "needs a path"),
        ("cxr:/no/such/workdir", FileNotFoundError, "does not exist"),
        ("inception:/no/such.pth", FileNotFoundError, "pytorch-fid/releases/download"),
    ],
)
def test_bad_specs_fail_before_loading_anything(spec, error, message):
    with pytest.raises(error, match=message):
        features.make_extractor(spec)


def test_workdir_without_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a launch.train_classifier workdir"):
        features.check_spec(f"cxr:{tmp_path}")


def test_pixels_batched_over_devices_equal_one_pass():
    images = images_u8(10, size=32)
    extractor = features.make_extractor("pixels:16")
    assert extractor is features.pixels_extractor(16)  # one apply_fn: one compile per shape
    # 10 images, batch 4 over the 4 test devices: three batches, the last padded.
    batched = features.extract(extractor, images, batch_size=4)
    one_device = parallel.make_mesh(jax.devices()[:1])
    whole = features.extract(extractor, images, batch_size=16, mesh=one_device)
    assert batched.shape == (10, 256) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, whole, atol=1e-6)
    reference = jax.image.resize(images[..., None] / 255.0, (10, 16, 16, 1), "linear")
    np.testing.assert_allclose(batched, np.asarray(reference).reshape(10, -1), atol=1e-5)
    same_size = features.extract(features.pixels_extractor(32), images, batch_size=4)
    np.testing.assert_allclose(same_size, images.reshape(10, -1) / 255.0, atol=1e-7)


def test_cache_is_keyed_by_image_content(tmp_path, monkeypatch):
    images = images_u8(8)
    extractor = features.pixels_extractor(16)
    first = features.extract(extractor, images, data_id="set", cache_dir=str(tmp_path))
    (cached,) = os.listdir(tmp_path)
    assert cached.startswith("pixels-") and cached.endswith(".npz")

    def no_compute(*args, **kwargs):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(features, "_compiled", no_compute)
    again = features.extract(extractor, images, data_id="set", cache_dir=str(tmp_path))
    np.testing.assert_array_equal(first, again)
    changed = images.copy()
    changed[0, 0, 0] ^= 1
    with pytest.raises(AssertionError, match="recomputed"):
        features.extract(extractor, changed, data_id="set", cache_dir=str(tmp_path))


def make_classifier_workdir(workdir, data_dir, *, step=6):
    """A train_classifier workdir (config.json + one checkpoint) without training."""
    config = classifier_configs.get_config("tiny")
    config.data.data_dir = data_dir
    config_lib.save_json(config, os.path.join(workdir, "config.json"))
    model = classifier.make_model(config.model, 2)
    tx, _ = optim.make_optimizer(config.optim, int(config.train.num_steps))
    init_fn = functools.partial(
        classifier.init_state, model, tx, image_shape=(28, 28, 1), use_ema=False
    )
    state = jax.jit(init_fn)(jax.random.PRNGKey(1))
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), best_metric="val/auc", async_save=False
    )
    checkpointer.save(step, state, metrics={"val/auc": 0.5})
    checkpointer.close()
    return config, model, state


def test_cxr_extractor_is_the_classifier_penultimate_layer(shipped_data_dir, tmp_path):
    config, model, state = make_classifier_workdir(str(tmp_path), shipped_data_dir)
    extractor = features.make_extractor(f"cxr:{tmp_path}")
    assert extractor.dim == model.num_features
    assert extractor.info["checkpoint_step"] == 6 and extractor.input_size == 28
    images = images_u8(4, size=28, seed=3)
    got = features.extract(extractor, images, batch_size=4)
    x = (images[..., None] / 255.0 - config.data.mean) / config.data.std
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    expected = model.apply(variables, jnp.asarray(x, jnp.float32), method="features")
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-5)
    # Other sizes get the classifier's resize (antialiased, as datasets are prepared).
    assert features.extract(extractor, images_u8(4, size=40), batch_size=4).shape == (4, 32)
