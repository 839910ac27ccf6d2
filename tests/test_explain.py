"""CAM / Grad-CAM point at the evidence; overlays for a trained workdir; the launcher."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import configs.classifier as classifier_configs
from cxrjax import explain
from cxrjax.data import sources
from cxrjax.train import classifier, classifier_run

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32
RADIUS = 6  # pixels around the blob centre that count as "on the blob"


def blob_films(rng: np.random.Generator, count: int):
    """Noisy films; label 1 = a bright Gaussian blob (sigma 2) at a random position."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    images = rng.normal(0.0, 0.35, (count, SIZE, SIZE))
    labels = rng.integers(0, 2, count)
    centres = rng.integers(6, SIZE - 6, (count, 2))
    for k in range(count):
        if labels[k]:
            cy, cx = centres[k]
            images[k] += 2.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 2.0**2))
    return images[..., None].astype(np.float32), labels, centres


@pytest.fixture(scope="module")
def blob_model():
    """A tiny DenseNet trained on blob films (80 steps of 32, seconds on the CPU)."""
    spec = sources.DatasetSpec("blobs", ("clear", "blob"))
    config = classifier_configs.get_config("tiny")
    model = classifier.make_model(config.model, spec.num_classes)
    tx = optax.adam(3e-3)
    state = classifier.init_state(model, tx, jax.random.key(0), (SIZE, SIZE, 1), use_ema=False)
    loss_fn = classifier.make_loss_fn(spec, np.ones(2, np.float32))
    step = jax.jit(
        classifier.make_train_step(model, tx, loss_fn, optax.constant_schedule(3e-3)),
        donate_argnums=0,
    )
    rng = np.random.default_rng(0)
    for index in range(80):
        images, labels, _ = blob_films(rng, 32)
        batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
        state, metrics = step(state, batch, jax.random.key(index))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return model, variables


def test_heatmaps_put_most_mass_on_the_blob(blob_model):
    model, variables = blob_model
    images, labels, centres = blob_films(np.random.default_rng(1), 64)
    logits = model.apply(variables, jnp.asarray(images), train=False)
    accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
    assert accuracy > 0.9, accuracy  # the classifier learned the task
    positive = labels == 1
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    masks = np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 <= RADIUS**2 for cy, cx in centres[positive]])
    area = masks.mean()  # ~11 % of the film
    for method in explain.METHODS:
        maps = np.asarray(explain.heatmaps(method, model, variables, images[positive], 1))
        assert maps.shape == (positive.sum(), SIZE, SIZE)
        fraction = explain.mass_fraction(maps, masks)
        assert np.median(fraction) > 0.5, (method, np.median(fraction), area)
        assert np.mean(fraction) > 3 * area, method


def test_gradcam_names_a_missing_layer(blob_model):
    model, variables = blob_model
    with pytest.raises(ValueError, match="no submodule named 'nope'"):
        explain.gradcam(model, variables, jnp.zeros((1, SIZE, SIZE, 1)), 1, layer="nope")


def test_overlays_for_a_trained_workdir_and_the_launcher(shipped_data_dir, tmp_path):
    config = classifier_configs.get_config("tiny")
    config.data.data_dir = shipped_data_dir
    config.train.update(num_steps=4, eval_every=2, checkpoint_every=2)
    config.eval.bootstrap = 10
    workdir = tmp_path / "run"
    classifier_run.train_and_evaluate(config, str(workdir))
    paths = explain.overlays(str(workdir), "val", [0, 5], method="cam")
    assert [os.path.basename(p) for p in paths] == ["val_cam.png", "val_cam_0.png", "val_cam_5.png"]
    assert all(os.path.getsize(p) > 2000 for p in paths)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.explain",
            f"--workdir={workdir}",
            "--split=val",
            "--num_images=2",
            f"--output_dir={tmp_path / 'out'}",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "val_gradcam.png").is_file()
    assert (tmp_path / "out" / "val_cam_1.png").is_file()  # --method=both by default
