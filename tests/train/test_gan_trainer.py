"""PGGAN trainer: schedule, traced alpha (one compile per resolution), exact resume mid-fade."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pggan as pggan_configs
from cxrjax import checkpoint as checkpoint_lib
from cxrjax import config as config_lib
from cxrjax import parallel
from cxrjax.data import builders
from cxrjax.train import gan, gan_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(data_dir, **schedule):
    config = pggan_configs.get_config("tiny")
    config.data.data_dir = data_dir
    config.schedule.update(schedule)
    return config


def test_schedule_matches_hand_values():
    # max 16, fade 100, stable 50: 4 stable [0,50), 8 fade [50,150), 8 stable [150,200),
    # 16 fade [200,300), 16 stable [300,350).
    cases = {
        0: (0, 4, "stable", 1.0),
        49: (0, 4, "stable", 1.0),
        50: (1, 8, "fade", 0.0),
        100: (1, 8, "fade", 0.5),
        149: (1, 8, "fade", 0.99),
        150: (2, 8, "stable", 1.0),
        199: (2, 8, "stable", 1.0),
        200: (3, 16, "fade", 0.0),
        275: (3, 16, "fade", 0.75),
        300: (4, 16, "stable", 1.0),
        10_000: (4, 16, "stable", 1.0),
    }
    for seen, (index, resolution, kind, alpha) in cases.items():
        phase, got = gan.schedule(seen, 16, 100, 50)
        assert (phase.index, phase.resolution, phase.kind) == (index, resolution, kind), seen
        assert got == pytest.approx(alpha), seen
        traced = jax.jit(gan.alpha_in_graph, static_argnums=(1, 2, 3))(seen, resolution, 100, 50)
        assert float(traced) == pytest.approx(alpha), seen
    assert [p.end for p in gan.phases(16, 100, 50)] == [50, 150, 200, 300, 350]
    assert gan_run.phase_end_step(gan.phases(16, 100, 50)[1], 16) == 10  # ceil(150 / 16)
    # A longer full-resolution phase changes only the last phase's end; past it, alpha is 1.
    longer = gan.phases(16, 100, 50, final_stable_images=400)
    assert [p.end for p in longer] == [50, 150, 200, 300, 700]
    assert longer[:-1] == gan.phases(16, 100, 50)[:-1]
    traced = jax.jit(gan.alpha_in_graph, static_argnums=(1, 2, 3))(650, 16, 100, 50)
    assert float(traced) == 1.0


def test_alpha_is_traced_one_compile_per_resolution():
    generator, discriminator = gan.make_models(
        dict(name="tiny", conditional=True, mbstd_group_size=2), num_classes=2, max_resolution=8
    )
    tx = gan.make_optimizer(dict(lr=1e-3, b1=0.0, b2=0.99, eps=1e-8))
    mesh = parallel.make_mesh()
    init = jax.jit(lambda key: gan.init_state(generator, discriminator, tx, tx, key))
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    steps = gan.CompiledSteps(
        lambda r: gan.make_train_step(
            generator,
            discriminator,
            (tx, tx),
            r,
            fade_images=64,
            stable_images=32,
        ),
        mesh,
        abstract,
    )
    batch = {
        "image": jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)), jnp.float32),
        "label": jnp.asarray([0, 1] * 4, jnp.int32),
    }
    alphas, adam_counts = [], []
    for seen in (32, 48, 80, 96):  # fade start, 1/4, 3/4, stable start
        state = init(jax.random.PRNGKey(0)).replace(images_seen=jnp.int32(seen))
        # Pretend Adam has run 5 steps: phase starts (fade, stable) reset it in-graph.
        state = state.replace(
            g_opt_state=(state.g_opt_state[0]._replace(count=jnp.int32(5)), *state.g_opt_state[1:])
        )
        state, metrics = steps(8)(state, batch, jax.random.PRNGKey(1))
        alphas.append(float(metrics["alpha"]))
        adam_counts.append(int(state.g_opt_state[0].count))
        assert int(state.images_seen) == seen + 8
        assert int(state.nonfinite_steps) == 0
    assert alphas == pytest.approx([0.0, 0.25, 0.75, 1.0])
    assert adam_counts == [1, 6, 6, 1]  # reset at the fade start and the stable start only
    assert len(steps.cache) == 1 and steps(8)._cache_size() == 1  # no recompiles for alpha


def test_bad_resolution_fails_before_data_read(tmp_path, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("data was read before validation")

    monkeypatch.setattr(builders, "prepare", no_data)
    monkeypatch.setattr(builders, "load", no_data)
    config = tiny_config(str(tmp_path))
    config.data.resolution = 24
    with pytest.raises(config_lib.ConfigError, match="data.resolution"):
        gan_run.train_and_evaluate(config, str(tmp_path / "wd"))
    config = tiny_config(str(tmp_path))
    config.train.global_batch_size = 17
    with pytest.raises(config_lib.ConfigError, match="mbstd_group_size"):
        gan_run.train_and_evaluate(config, str(tmp_path / "wd"))


def _final_state(workdir):
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step()
    state, _ = ckpt.restore(step, None)
    data = json.loads((ckpt.directory / str(step) / "data" / "process_0-of-1.json").read_text())
    ckpt.close()
    return step, state, data


def test_resume_mid_fade_equals_uninterrupted(shipped_data_dir, tmp_path):
    # Max 8, batch 16: 4 stable = steps 1-2, 8 fade = steps 3-6, 8 stable = steps 7-8.
    config = tiny_config(shipped_data_dir, fade_images=64, stable_images=32)
    config.data.resolution = 8
    config.train.log_every = 1
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    full = gan_run.train_and_evaluate(config, straight)
    assert full["step"] == 8 and full["images_seen"] == 128
    assert full["compiled_resolutions"] == [4, 8]  # 3 phases, one compile per resolution
    alphas = {row["step"]: row["train/alpha"] for row in full["history"]}
    assert [alphas[s] for s in range(3, 9)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    partial = gan_run.train_and_evaluate(config, resumed, stop_at=4)  # alpha 0.5 next
    assert partial == {"finished": False, "step": 4, "preempted": False}
    gan_run.train_and_evaluate(config, resumed)  # fresh iterator, state, checkpointer

    step_a, state_a, data_a = _final_state(straight)
    step_b, state_b, data_b = _final_state(resumed)
    assert step_a == step_b == 8
    assert data_a == data_b
    for key in ("g_params", "d_params", "g_ema_params", "g_opt_state", "d_opt_state"):
        leaves_a, leaves_b = jax.tree.leaves(state_a[key]), jax.tree.leaves(state_b[key])
        assert leaves_a
        for a, b in zip(leaves_a, leaves_b, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=key)
    assert int(state_b["images_seen"]) == 128


def test_train_pggan_entry_point_tiny(shipped_data_dir, tmp_path):
    workdir = tmp_path / "wd"
    command = [
        sys.executable,
        "-m",
        "launch.train_pggan",
        "--config=configs/pggan.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.data_dir={shipped_data_dir}",
        "--config.schedule.fade_images=16",
        "--config.schedule.stable_images=16",
    ]
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        # The settings conftest gives this process: fast compiles and the shared compile cache.
        JAX_DISABLE_MOST_OPTIMIZATIONS="true",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    )
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["step"] == 5 and results["compiled_resolutions"] == [4, 8, 16]
    assert [p["resolution"] for p in results["phases"]] == [4, 8, 8, 16, 16]
    pngs = sorted(os.listdir(workdir / "samples"))
    assert len(pngs) == 5 and pngs[-1] == "phase04_16x16_stable.png"
    assert all((workdir / "samples" / p).stat().st_size > 0 for p in pngs)


def test_batch_sizes_per_resolution_schedule():
    assert gan.parse_batch_sizes("", 16, 32) == {4: 16, 8: 16, 16: 16, 32: 16}
    assert gan.parse_batch_sizes("4:64,16:32, 32:8", 16, 64) == {
        4: 64,
        8: 64,
        16: 32,
        32: 8,
        64: 8,
    }
    assert gan.parse_batch_sizes("8:4", 16, 16) == {4: 16, 8: 4, 16: 4}
    with pytest.raises(ValueError, match="resolution:batch"):
        gan.parse_batch_sizes("4=64", 16, 16)
    # max 8, fade 64, stable 32, batch 16 at 4 px and 8 at 8 px: 2 + 8 + 4 steps.
    all_phases = gan.phases(8, 64, 32)
    assert gan.phase_end_steps(all_phases, {4: 16, 8: 8}) == [2, 10, 14]
    # One batch: the same as the per-phase ceil formula (boundaries need not be multiples).
    one = gan.phases(16, 100, 50)
    assert gan.phase_end_steps(one, dict.fromkeys((4, 8, 16), 16)) == [
        gan_run.phase_end_step(p, 16) for p in one
    ]


def test_varying_batch_needs_phase_lengths_on_batch_boundaries(tmp_path):
    config = tiny_config(str(tmp_path), fade_images=60, stable_images=32)
    config.train.batch_sizes = "4:16,8:8"
    with pytest.raises(config_lib.ConfigError, match="schedule.fade_images.*multiple"):
        gan_run.validate(config)
    config.train.batch_sizes = "4:16,8:6"  # 6 is not a multiple of the group of 4
    config.model.mbstd_group_size = 4
    with pytest.raises(config_lib.ConfigError, match="train.batch_sizes.*mbstd"):
        gan_run.validate(config)


def test_per_resolution_batches_resume_across_the_batch_change(shipped_data_dir, tmp_path):
    # Max 8: 4 px at batch 16 (steps 1-2), 8 px at batch 8 (fade steps 3-10, stable 11-14).
    config = tiny_config(shipped_data_dir, fade_images=64, stable_images=32)
    config.data.resolution = 8
    config.train.update(batch_sizes="4:16,8:8", log_every=1)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    full = gan_run.train_and_evaluate(config, straight)
    assert full["step"] == 14 and full["images_seen"] == 128
    assert [(p["batch"], p["end_step"]) for p in full["phases"]] == [(16, 2), (8, 10), (8, 14)]
    seen = {row["step"]: row["train/images_seen"] for row in full["history"]}
    assert [seen[s] for s in (1, 2, 3, 4)] == [16, 32, 40, 48]
    gan_run.train_and_evaluate(config, resumed, stop_at=1)  # inside the batch-16 phase
    gan_run.train_and_evaluate(config, resumed, stop_at=5)  # mid-fade at batch 8
    gan_run.train_and_evaluate(config, resumed)
    step_a, state_a, data_a = _final_state(straight)
    step_b, state_b, data_b = _final_state(resumed)
    assert step_a == step_b == 14 and data_a == data_b
    for a, b in zip(
        jax.tree.leaves(state_a["g_ema_params"]),
        jax.tree.leaves(state_b["g_ema_params"]),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_compute_option_traces_with_fp32_params(tmp_path):
    config = tiny_config(str(tmp_path))
    config.model.dtype = "float16"
    with pytest.raises(config_lib.ConfigError, match="model.dtype"):
        gan_run.validate(config)
    model_config = dict(name="tiny", conditional=True, mbstd_group_size=2, dtype="bfloat16")
    generator, discriminator = gan.make_models(model_config, num_classes=2, max_resolution=8)
    assert generator.dtype == discriminator.dtype == jnp.bfloat16
    tx = gan.make_optimizer(dict(lr=1e-3, b1=0.0, b2=0.99, eps=1e-8))
    state = jax.eval_shape(
        lambda key: gan.init_state(generator, discriminator, tx, tx, key), jax.random.PRNGKey(0)
    )
    assert {x.dtype for x in jax.tree.leaves(state.g_params)} == {jnp.dtype(jnp.float32)}
    step = gan.make_train_step(
        generator, discriminator, (tx, tx), 8, fade_images=8, stable_images=8
    )
    batch = {
        "image": jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.float32),
        "label": jax.ShapeDtypeStruct((4,), jnp.int32),
    }
    new_state, metrics = jax.eval_shape(step, state, batch, jax.random.PRNGKey(1))
    assert {x.dtype for x in jax.tree.leaves(new_state.g_params)} == {jnp.dtype(jnp.float32)}
    assert metrics["g/g_loss"].dtype == jnp.float32


def test_conditioning_projection_scores_an_image_as_its_class():
    """Projection: D's score of a real of class y is its critic output plus the logit of y,
    with no class cross-entropy (AC-GAN's plain score is checked by the other tests)."""
    conditioning = "projection"
    generator, discriminator = gan.make_models(
        dict(name="tiny", conditional=True, mbstd_group_size=2), num_classes=2, max_resolution=8
    )
    tx = gan.make_optimizer(dict(lr=1e-3, b1=0.0, b2=0.99, eps=1e-8))
    state = gan.init_state(generator, discriminator, tx, tx, jax.random.PRNGKey(0))
    step = jax.jit(
        gan.make_train_step(
            generator, discriminator, (tx, tx), 4, fade_images=64, stable_images=32,
            conditioning=conditioning,
        )
    )  # fmt: skip
    images = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
    labels = np.array([0, 1] * 4, np.int32)
    _, metrics = step(state, {"image": images, "label": labels}, jax.random.PRNGKey(1))
    reals = gan.pggan.resize_reals(jnp.asarray(images), 4)
    scores, logits = discriminator.apply(
        {"params": state.d_params}, reals, labels, resolution=4, alpha=1.0
    )
    own = np.asarray(logits)[np.arange(8), labels]
    expected = np.asarray(scores).reshape(8) + own
    assert float(metrics["d/real_score"]) == pytest.approx(expected.mean(), rel=1e-4, abs=1e-5)
    assert "d/cls_real" not in metrics
    with pytest.raises(ValueError, match="conditioning"):
        gan.make_train_step(
            generator, discriminator, (tx, tx), 4, fade_images=64, stable_images=32,
            conditioning="hinge",
        )  # fmt: skip
