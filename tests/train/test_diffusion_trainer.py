"""DDPM trainer: jitted sampler determinism, validation before data, exact resume, CLI smoke."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import configs.ddpm as ddpm_configs
from cxrjax import checkpoint as checkpoint_lib
from cxrjax import diffusion
from cxrjax.data import builders
from cxrjax.models import unet
from cxrjax.train import diffusion as ddpm
from cxrjax.train import diffusion_run, optim

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(data_dir, **train):
    config = ddpm_configs.get_config("tiny")
    config.data.data_dir = data_dir
    config.train.update(train)
    return config


@pytest.fixture(scope="module")
def tiny_setup():
    """unet_tiny (2 classes) at 8x8 with the tiny preset's optimizer; state from a jitted init."""
    model = unet.unet_tiny(num_classes=2)
    tx, lr = optim.make_optimizer(ddpm_configs.get_config("tiny").optim, 4)
    init = jax.jit(functools.partial(ddpm.init_state, model, tx, image_shape=(8, 8, 1)))
    return model, tx, lr, init(jax.random.PRNGKey(0))


def test_sampler_takes_params_as_argument_and_is_deterministic(tiny_setup):
    model, _, _, state = tiny_setup
    params = state.ema_params
    sample = jax.jit(
        ddpm.make_sample_fn(
            model, diffusion.linear_schedule(50), (8, 8, 1), steps=3, guidance_scale=1.0
        )
    )
    labels = np.array([0, 0, 1, 1], np.int32)
    a = sample(params, jax.random.PRNGKey(1), labels)
    b = sample(params, jax.random.PRNGKey(1), labels)
    assert a.shape == (4, 8, 8, 1) and np.all(np.abs(np.asarray(a)) <= 1.0 + 1e-6)
    np.testing.assert_array_equal(a, b)  # same seed -> same grid
    other = jax.tree.map(lambda p: p + 0.05, params)
    c = sample(other, jax.random.PRNGKey(1), labels)
    assert not np.allclose(a, c)  # params are an argument, not baked-in constants
    assert sample._cache_size() == 1  # ... and new params reuse the one compiled program


def test_train_step_updates_and_skips_nonfinite(tiny_setup):
    model, tx, lr, state = tiny_setup
    step = jax.jit(
        ddpm.make_train_step(
            model,
            tx,
            diffusion.linear_schedule(50),
            lr_schedule=lr,
            label_dropout=0.1,
            ema_decay=0.9,
        )
    )
    batch = {
        "image": np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32),
        "label": np.array([0, 1, 0, 1], np.int32),
    }
    new, metrics = step(state, batch, jax.random.PRNGKey(1))
    assert np.isfinite(float(metrics["loss"])) and int(new.step) == 1
    assert int(new.nonfinite_steps) == 0
    # EMA warm-up at step 0: decay = min(0.9, 1/10) = 0.1 -> ema = 0.1 * old + 0.9 * new.
    leaf = lambda s, tree: jax.tree.leaves(getattr(s, tree))[0]  # noqa: E731
    np.testing.assert_allclose(
        leaf(new, "ema_params"), 0.1 * leaf(state, "params") + 0.9 * leaf(new, "params"), atol=1e-6
    )
    bad = dict(batch, image=np.full_like(batch["image"], np.nan))
    skipped, metrics = step(new, bad, jax.random.PRNGKey(2))
    assert int(skipped.step) == 2 and int(skipped.nonfinite_steps) == 1
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(skipped.params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "field, value",
    [
        ("model.name", "unet_huge"),
        ("diffusion.prediction", "x0"),
        ("diffusion.label_dropout", 1.5),
        ("data.resolution", 18),  # unet_demo32 needs a multiple of 4
        ("sample.steps", 5000),
        ("optim.lr", -1.0),
    ],
)
def test_bad_config_fails_before_any_data_read(monkeypatch, tmp_path, field, value):
    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the config was validated")

    monkeypatch.setattr(builders, "prepare", no_data)
    monkeypatch.setattr(builders, "load", no_data)
    config = ddpm_configs.get_config("tiny")
    if field == "data.resolution":
        config.model.name = "unet_demo32"
    node = config
    *parents, leaf = field.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ValueError, match=field.split(".")[-1]):
        diffusion_run.train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "config.json")


def _final_state(workdir):
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step()
    state, _ = ckpt.restore(step, None)
    data = json.loads((ckpt.directory / str(step) / "data" / "process_0-of-1.json").read_text())
    ckpt.close()
    return step, state, data


def test_stop_and_resume_equals_uninterrupted(shipped_data_dir, tmp_path):
    # No periodic saves (each costs seconds on 4 fake devices): stop_at and the end save.
    config = tiny_config(shipped_data_dir, num_steps=4, checkpoint_every=0, sample_every=4)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    full = diffusion_run.train_and_evaluate(config, straight)
    partial = diffusion_run.train_and_evaluate(config, resumed, stop_at=2)
    assert partial == {"finished": False, "step": 2, "preempted": False}
    assert not os.path.exists(os.path.join(resumed, "results.json"))
    again = diffusion_run.train_and_evaluate(config, resumed)  # fresh iterator, state, manager

    step_a, state_a, data_a = _final_state(straight)
    step_b, state_b, data_b = _final_state(resumed)
    assert step_a == step_b == 4
    assert data_a == data_b  # the iterator stands at the same next batch
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert full["losses"]["4"] == pytest.approx(again["losses"]["4"], abs=1e-6)
    assert set(again["losses"]) == {"2", "4"}  # the whole run's log, across the resume
    assert again["start_step"] == 2 and full["nonfinite_steps"] == 0
    # Same seed, same EMA params -> byte-identical sample grid from fixed noise per class.
    grid = os.path.join("samples", "step_000004.png")
    with (
        open(os.path.join(straight, grid), "rb") as f,
        open(os.path.join(resumed, grid), "rb") as g,
    ):
        assert f.read() == g.read()
    # A finished run returns its saved results instead of training again.
    assert diffusion_run.train_and_evaluate(config, resumed)["wall_time_s"] == again["wall_time_s"]


def test_train_ddpm_entry_point(shipped_data_dir, tmp_path):
    workdir = tmp_path / "wd"
    command = [
        sys.executable,
        "-m",
        "launch.train_ddpm",
        "--config=configs/ddpm.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.data_dir={shipped_data_dir}",
    ]
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        JAX_DISABLE_MOST_OPTIMIZATIONS="true",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
    )
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["final_step"] == 4 and np.isfinite(results["final_loss"])
    assert results["samples"] == ["samples/step_000004.png"]
    assert (workdir / "samples" / "step_000004.png").stat().st_size > 0
    assert results["wall_time_s"] > 0 and (workdir / "config.json").exists()


@pytest.mark.parametrize("preset", ["tiny", "pneumonia_mnist"])
def test_presets_validate(preset):
    diffusion_run.validate(ddpm_configs.get_config(preset))
