"""Two processes on localhost (gloo) x 2 devices train exactly like one process x 4 devices,
and a checkpoint written by two processes restores in one."""

import functools
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from cxrjax import checkpoint as checkpoint_lib
from cxrjax import parallel
from cxrjax.train import classifier, classifier_run, optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )


def _train_command(workdir, data_dir, *extra):
    return [
        sys.executable, "-m", "launch.train_classifier", "--config=configs/classifier.py:tiny",
        f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *extra,
    ]  # fmt: skip


def _params(workdir):
    """The final state, restored onto this process's devices (a target built from the config)."""
    config = classifier_run.load_run_config(str(workdir))
    model = classifier.make_model(config.model, 2)
    tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
    init = functools.partial(
        classifier.init_state, model, tx, image_shape=(28, 28, 1), use_ema=False
    )
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    target = checkpoint_lib.abstract_like(abstract, parallel.replicated(parallel.make_mesh()))
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    state, _ = ckpt.restore(ckpt.latest_step(), target)
    ckpt.close()
    return jax.device_get({"params": state.params, "batch_stats": state.batch_stats})


@pytest.mark.slow
def test_two_processes_equal_one_process_and_checkpoints_cross_over(shipped_data_dir, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    port = _free_port()
    workers = [
        subprocess.Popen(
            _train_command(
                multi, shipped_data_dir, f"--coordinator_address=localhost:{port}",
                "--num_processes=2", f"--process_id={i}",
            ),
            cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]  # fmt: skip
    done = subprocess.run(
        _train_command(single, shipped_data_dir), cwd=REPO, env=_env(4), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for worker in workers:
        output, _ = worker.communicate(timeout=600)
        assert worker.returncode == 0, output[-3000:]

    results = [json.loads((d / "results.json").read_text()) for d in (single, multi)]
    assert results[0]["device"]["process_count"] == 1
    assert results[1]["device"]["process_count"] == 2
    # Same predictions up to float reduction order, same record order: same metrics and CIs.
    assert results[0]["test"]["auc"] == pytest.approx(results[1]["test"]["auc"], abs=1e-6)
    assert results[0]["test"]["auc_ci"] == pytest.approx(results[1]["test"]["auc_ci"], abs=1e-6)
    assert results[0]["test"]["confusion_matrix"] == results[1]["test"]["confusion_matrix"]
    assert [h["train/loss"] for h in results[0]["history"]] == pytest.approx(
        [h["train/loss"] for h in results[1]["history"]], abs=1e-6
    )
    for a, b in zip(_flatten(_params(single)), _flatten(_params(multi)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Both processes saved their own iterator state; only process 0 wrote results and logs.
    step_dir = multi / "checkpoints" / str(results[1]["num_steps"]) / "data"
    assert sorted(os.listdir(step_dir))[:2] == ["commit_success.txt", "process_0-of-2.json"][:2]
    assert (step_dir / "process_1-of-2.json").exists()

    # The two-process checkpoint restores in one process with a different device count.
    evaluated = subprocess.run(
        [sys.executable, "-m", "launch.evaluate_classifier", f"--workdir={multi}",
         "--split=test", f"--output={tmp_path / 'eval'}"],
        cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "results.json").read_text())
    if results[1]["selected_step"] == again["step"]:
        assert again["test"]["auc"] == pytest.approx(results[1]["test"]["auc"], abs=1e-9)


def _flatten(tree):
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from _flatten(tree[key])
    elif tree is not None:
        yield np.asarray(tree)
