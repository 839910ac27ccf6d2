"""Non-finite values: skip (counted) or abort (naming step and metric); never checkpointed."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy_trainer

from cxrjax import checkpoint as checkpoint_lib
from cxrjax.train import loop


def restored_states(workdir) -> dict[int, object]:
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    states = {step: ckpt.restore(step, None)[0] for step in ckpt.all_steps()}
    ckpt.close()
    return states


def assert_all_finite(tree):
    for leaf in jax.tree.leaves(tree):
        if np.issubdtype(np.asarray(leaf).dtype, np.floating):
            assert np.all(np.isfinite(leaf))


def test_abort_names_the_exact_step_and_metric_and_saves_nothing_after_it(tmp_path):
    # The NaN comes at step 3, between log steps (4, 8) and just before a save (4): the error
    # must name step 3, and no checkpoint at or after it may exist.
    with pytest.raises(loop.NonFiniteError, match=r"non-finite .*train/loss=nan at step 3"):
        toy_trainer.train(
            str(tmp_path), nonfinite="abort", poison_step=3, checkpoint_every=2, log_every=4
        )
    states = restored_states(tmp_path)
    assert sorted(states) == [2]
    assert_all_finite(states[2])


def test_skip_counts_the_step_and_keeps_training(tmp_path):
    result = toy_trainer.train(str(tmp_path), nonfinite="skip", poison_step=3, log_every=1)
    assert result["step"] == 12
    assert np.isnan(result["losses"][3]) and np.isfinite(result["losses"][4])
    states = restored_states(tmp_path)
    assert sorted(states) == [8, 12]
    for state in states.values():
        assert int(state["nonfinite_steps"]) == 1
        assert_all_finite(state)


def test_a_nonfinite_state_is_never_checkpointed(tmp_path):
    # A step without the in-graph guard lets the NaN into the parameters; the loop's check
    # before each save refuses it, naming the leaf, and the previous checkpoint stays.
    with pytest.raises(loop.NonFiniteError, match=r"non-finite values in .*params.* at step 4"):
        toy_trainer.train(str(tmp_path), poison_step=3, skip_nonfinite=False, log_every=4)
    assert sorted(restored_states(tmp_path)) == []
    with pytest.raises(loop.NonFiniteError, match=r"\['b'\] at step 4"):
        loop.check_state_finite({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.inf])}, 4)
    loop.check_state_finite({"a": jnp.ones(2), "n": jnp.zeros((), jnp.int32)}, 4)


def test_abort_catches_a_skipped_step_whose_logged_metrics_look_finite():
    # Only the skip counter moved (e.g. a NaN gradient with a finite loss).
    scalars = {"train/loss": 0.5, "train/nonfinite_steps": 2.0}
    with pytest.raises(loop.NonFiniteError, match="nonfinite_steps=2.0 at step 7"):
        loop._check_finite(7, scalars, skipped_before=1.0)
    loop._check_finite(7, scalars, skipped_before=2.0)
