"""Exact continuation and determinism of every trainer at 1 and 2 devices (tiny configs).

For each trainer: an uninterrupted run of N steps, and a run stopped after K steps (with its
checkpoint) then resumed by a fresh call with a fresh iterator, state and checkpoint manager.
Their logged losses must agree at every step — steps 1..K come from two fresh runs with the
same seed (determinism), steps K+1..N from the resumed one (continuation) — and the final
states and data-iterator positions must be identical (bitwise: same device count, same
compiled steps). The 4-device case is in tests/train/test_*; 2 processes in
tests/test_multiprocess.py.
"""

import json
import os

import jax
import numpy as np
import pytest

import configs.classifier as classifier_configs
import configs.ddpm as ddpm_configs
import configs.pggan as pggan_configs
from cxrjax import checkpoint as checkpoint_lib
from cxrjax import parallel
from cxrjax.train import classifier_run, diffusion_run, gan_run


def classifier_case(data_dir):
    config = classifier_configs.get_config("tiny")
    config.data.data_dir = data_dir
    config.train.update(num_steps=6, log_every=1, eval_every=0, checkpoint_every=0, select="last")
    config.eval.bootstrap = 0
    return classifier_run.train_and_evaluate, config, 3


def pggan_case(data_dir):
    # Max 8, batch 16: 4x4 stable = steps 1-2, 8x8 fade = steps 3-4, 8x8 stable = steps 5-6;
    # stopping after step 3 resumes mid-fade.
    config = pggan_configs.get_config("tiny")
    config.data.update(data_dir=data_dir, resolution=8)
    config.schedule.update(fade_images=32, stable_images=32)
    config.train.log_every = 1
    config.samples.per_class = 1
    return gan_run.train_and_evaluate, config, 3


def ddpm_case(data_dir):
    config = ddpm_configs.get_config("tiny")
    config.data.data_dir = data_dir
    config.train.update(num_steps=4, log_every=1, checkpoint_every=0, sample_every=0)
    config.sample.update(steps=2, per_class=1)
    return diffusion_run.train_and_evaluate, config, 2


CASES = {"classifier": classifier_case, "pggan": pggan_case, "ddpm": ddpm_case}


def logged_losses(workdir) -> dict[int, dict[str, float]]:
    """Every logged loss-like metric by step, over all sessions of the workdir."""
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {
        row["step"]: {k: v for k, v in row.items() if k.startswith("train/") and "loss" in k}
        for row in rows
    }


def final_checkpoint(workdir):
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step()
    state, _ = ckpt.restore(step, None)
    data = (ckpt.directory / str(step) / "data" / "process_0-of-1.json").read_text()
    ckpt.close()
    return step, state, data


# Every trainer at 1 and 2 devices (each case costs three short runs of compiles); at 4 devices
# the trainers' own resume tests in tests/train/ cover it.
@pytest.mark.parametrize(
    ("trainer", "num_devices"),
    [("classifier", 1), ("classifier", 2), ("pggan", 1), ("pggan", 2), ("ddpm", 1), ("ddpm", 2)],
)
def test_stop_and_resume_equals_uninterrupted(
    shipped_data_dir, tmp_path, monkeypatch, trainer, num_devices
):
    make_mesh = parallel.make_mesh
    monkeypatch.setattr(
        parallel, "make_mesh", lambda devices=None: make_mesh(jax.devices()[:num_devices])
    )
    train, config, stop = CASES[trainer](shipped_data_dir)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train(config, straight)
    partial = train(config, resumed, stop_at=stop)
    assert partial == {"finished": False, "step": stop, "preempted": False}
    train(config, resumed)

    losses_a, losses_b = logged_losses(straight), logged_losses(resumed)
    assert sorted(losses_a) == sorted(losses_b) and len(losses_a) > stop
    assert losses_a == losses_b  # exactly, every step: determinism + continuation
    step_a, state_a, data_a = final_checkpoint(straight)
    step_b, state_b, data_b = final_checkpoint(resumed)
    assert step_a == step_b == max(losses_a)
    assert data_a == data_b  # the iterator stands at the same next batch
    leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
    assert len(leaves_a) == len(leaves_b) > 0
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(a, b)
