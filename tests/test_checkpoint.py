"""Checkpointer: retention (last K + best, newest kept), iterator state, corrupt-step recovery."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax import checkpoint as checkpoint_lib
from cxrjax import parallel
from cxrjax.data import pipeline, sources


def _state(value: float):
    return {"w": jnp.full((3,), value), "step": jnp.asarray(int(value), jnp.int32)}


def test_keeps_last_k_and_the_best_and_never_the_newest(tmp_path):
    ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=2, best_metric="val/auc")
    aucs = {1: 0.70, 2: 0.95, 3: 0.80, 4: None, 5: 0.60}
    for step, auc in aucs.items():
        metrics = None if auc is None else {"val/auc": auc}
        ckpt.save(step, _state(step), metrics=metrics)
        ckpt.wait()
    assert ckpt.all_steps() == [2, 4, 5]  # best (2) + last two (4, 5); 5 is the worst but newest
    assert ckpt.best_step() == 2
    restored, meta = ckpt.restore(2, checkpoint_lib.abstract_like(_state(0), None_sharding()))
    assert meta["step"] == 2
    np.testing.assert_array_equal(restored["w"], np.full(3, 2.0))
    ckpt.close()


def None_sharding():  # noqa: N802 - reads as a value
    return parallel.replicated(parallel.make_mesh(jax.devices()[:1]))


def test_iterator_state_round_trips(tmp_path):
    images = np.arange(40 * 8 * 8, dtype=np.uint8).reshape(40, 8, 8)
    source = sources.ArraySource(images, np.arange(40) % 2)
    spec = sources.DatasetSpec("toy", ("a", "b"))
    make = lambda: pipeline.make_train_iterator(  # noqa: E731
        source,
        spec,
        global_batch_size=4,
        seed=3,
        resolution=8,
        device_count=1,
        process_count=1,
        process_index=0,
    )
    iterator = make()
    for _ in range(3):
        next(iterator)
    ckpt = checkpoint_lib.Checkpointer(tmp_path)
    ckpt.save(3, _state(3), data_iterator=iterator)
    ckpt.wait()
    expected = next(iterator)["index"]
    fresh = make()
    ckpt.restore(3, checkpoint_lib.abstract_like(_state(0), None_sharding()), data_iterator=fresh)
    np.testing.assert_array_equal(next(fresh)["index"], expected)
    ckpt.close()


def test_unreadable_newest_step_is_set_aside_and_previous_restored(tmp_path):
    ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=5)
    for step in (1, 2):
        ckpt.save(step, _state(step))
        ckpt.wait()
    # Corrupt step 2's array data (a torn write that still got committed).
    for path in (tmp_path / "2" / "state").rglob("*"):
        if path.is_file() and "manifest" not in path.name and path.suffix != ".json":
            path.write_bytes(b"garbage")
    abstract = checkpoint_lib.abstract_like(_state(0), None_sharding())
    state, meta = ckpt.restore_latest(abstract)
    assert meta["step"] == 1
    np.testing.assert_array_equal(state["w"], np.full(3, 1.0))
    assert (tmp_path / "corrupt-2").is_dir()  # set aside, never deleted
    assert ckpt.all_steps() == [1]
    ckpt.close()


def test_empty_workdir_restores_nothing_and_a_lone_bad_step_is_an_error(tmp_path):
    ckpt = checkpoint_lib.Checkpointer(tmp_path / "a")
    assert ckpt.restore_latest(checkpoint_lib.abstract_like(_state(0), None_sharding())) is None
    ckpt.save(1, _state(1))
    ckpt.wait()
    for path in (tmp_path / "a" / "1" / "state").rglob("*"):
        if path.is_file() and path.suffix != ".json":
            path.write_bytes(b"garbage")
    with pytest.raises(checkpoint_lib.CheckpointError, match="no readable checkpoint"):
        ckpt.restore_latest(checkpoint_lib.abstract_like(_state(0), None_sharding()))
    ckpt.close()


def test_iterator_state_saved_by_another_process_count_carries_over(tmp_path):
    """Pipelines batch before to_iter_dataset, so every process holds the same state: a step
    saved by 2 processes resumes the data position on 1 (and back); states that differ
    between processes are refused."""
    images = np.arange(40 * 8 * 8, dtype=np.uint8).reshape(40, 8, 8)
    source = sources.ArraySource(images, np.arange(40) % 2)
    spec = sources.DatasetSpec("toy", ("a", "b"))

    def make():
        return pipeline.make_train_iterator(
            source, spec, global_batch_size=4, seed=3, resolution=8, device_count=1,
            process_count=1, process_index=0,
        )  # fmt: skip

    ckpt = checkpoint_lib.Checkpointer(tmp_path)
    iterator = make()
    for _ in range(3):
        next(iterator)
    ckpt.save(3, _state(3), data_iterator=iterator)
    ckpt.wait()
    expected = next(iterator)["index"]
    # Rewrite step 3 as two processes would have written it.
    data = tmp_path / "3" / "data"
    state_text = (data / "process_0-of-1.json").read_text()
    (data / "process_0-of-1.json").unlink()
    for p in range(2):
        (data / f"process_{p}-of-2.json").write_text(state_text)
    abstract = checkpoint_lib.abstract_like(_state(0), None_sharding())
    fresh = make()
    _, meta = ckpt.restore(3, abstract, data_iterator=fresh)
    assert meta["step"] == 3
    np.testing.assert_array_equal(next(fresh)["index"], expected)

    (data / "process_1-of-2.json").write_text(state_text.replace("3", "5"))
    with pytest.raises(checkpoint_lib.CheckpointError, match="not shared by its processes"):
        ckpt.restore(3, abstract, data_iterator=make())
    ckpt.close()
