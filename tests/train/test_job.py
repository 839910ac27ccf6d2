"""A fifth model family is one `Job` subclass and one config: train, preemption, resume, load.

The toy family (a linear softmax classifier on fixed random vectors) has no checkpoint,
resume, preemption, metric or loading code of its own: `job.train` and `runs.load` give it
all of that, as they do the four real families.
"""

import json
import os
import signal

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import struct

from cxrjax import config as config_lib
from cxrjax.train import job as job_lib
from cxrjax.train import runs


def get_config():
    """The toy family's config file (what configs/<family>.py would hold)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict({"num_examples": 64, "features": 8, "classes": 3})
    config.optim = ml_collections.ConfigDict({"lr": 0.5})
    config.train = ml_collections.ConfigDict(
        {
            "num_steps": 6,
            "global_batch_size": 8,
            "log_every": 1,
            "checkpoint_every": 2,
            "keep_checkpoints": 3,
            "nonfinite": "skip",
        }
    )
    return config


@struct.dataclass
class LinearState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


class LinearJob(job_lib.Job):
    """What the family says: its config rules, data, state, step and summary. Nothing else."""

    name = "linear"

    def __init__(self, sigterm_at: int | None = None):
        self.sigterm_at = sigterm_at  # the test's stand-in for a cluster preemption notice

    def validate(self, config) -> None:
        config_lib.check_fields(config, (("data.*", config_lib.integer(ge=1)),))

    def build(self, config, workdir, mesh) -> job_lib.Plan:
        data = config.data
        key = np.random.default_rng(config.seed)
        images = key.normal(size=(data.num_examples, data.features)).astype(np.float32)
        labels = (images[:, 0] > 0).astype(np.int32) + (images[:, 1] > 1).astype(np.int32)
        records = [{"image": x, "label": y} for x, y in zip(images, labels, strict=True)]
        batches = iter(
            grain.MapDataset.source(records)
            .shuffle(seed=config.seed)
            .repeat()
            .batch(int(config.train.global_batch_size))
            .to_iter_dataset()
        )
        tx = optax.sgd(config.optim.lr)

        def init_fn(rng):
            w = 0.01 * jax.random.normal(rng, (data.features, data.classes))
            params = {"w": w, "b": jnp.zeros((data.classes,))}
            return LinearState(jnp.zeros((), jnp.int32), params, tx.init(params), rng)

        def loss_fn(params, batch):
            logits = batch["image"] @ params["w"] + params["b"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

        @jax.jit
        def train_step(state, batch, rng):
            del rng
            loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {
                "loss": loss
            }

        calls = []

        def step(state, batch, rng):
            calls.append(1)
            if len(calls) == self.sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return train_step(state, batch, rng)

        return job_lib.Plan(
            init_fn=init_fn,
            batches=batches,
            train_step=step,
            signature={"dataset": f"toy:{data.num_examples}x{data.features}"},
        )

    def finish(self, config, plan, ended) -> dict:
        losses = [row["train/loss"] for row in ended.history]
        return {"final_step": ended.step, "losses": losses}


def _leaves(state):
    return jax.tree.leaves(jax.device_get(state))


def test_a_toy_family_trains_is_preempted_resumes_exactly_and_loads(tmp_path):
    config = get_config()
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")

    full = job_lib.train(LinearJob(), config, straight)
    assert full["final_step"] == 6 and len(full["losses"]) == 6
    assert full["losses"][-1] < full["losses"][0]
    with open(os.path.join(straight, "results.json")) as f:
        assert json.load(f)["final_step"] == 6
    assert os.path.exists(os.path.join(straight, "metrics.jsonl"))
    assert os.path.exists(os.path.join(straight, "config.json"))

    # SIGTERM during step 3: the step finishes, is checkpointed, and the run says so.
    stopped = job_lib.train(LinearJob(sigterm_at=3), config, resumed)
    assert stopped == {"finished": False, "step": 3, "preempted": True}
    assert not os.path.exists(os.path.join(resumed, "results.json"))
    # The same command again resumes (state and input position) and finishes.
    again = job_lib.train(LinearJob(), config, resumed)
    assert again["final_step"] == 6
    np.testing.assert_array_equal(again["losses"], full["losses"])  # every session's rows
    # A finished run returns its saved results without training.
    assert job_lib.train(LinearJob(sigterm_at=1), config, resumed)["final_step"] == 6

    a, b = runs.load(straight, host=True), runs.load(resumed, host=True)
    assert a.family == b.family == "linear" and a.step == b.step == 6
    assert a.config.to_dict() == config.to_dict() and a.results()["final_step"] == 6
    for x, y in zip(_leaves(a.state), _leaves(b.state), strict=True):
        np.testing.assert_array_equal(x, y)  # bit-exact
    np.testing.assert_array_equal(a.params["w"], b.params["w"])


def test_a_bad_toy_config_is_one_config_error_before_any_file(tmp_path):
    config = get_config()
    config.data.features = 0
    with pytest.raises(config_lib.ConfigError, match="config.data.features"):
        job_lib.train(LinearJob(), config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()
