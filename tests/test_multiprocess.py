"""Two processes on localhost (gloo): they train exactly like one process with the same global
batch and device count, stop together on a signal to either, and their checkpoints resume
(data position included) on one process and vice versa.

The classifier and the DDPM run through their real entry points (2 x 2 devices vs 1 x 4);
preemption and cross-process-count resumes use tests/faults/toy_trainer.py (the same pipeline,
checkpoint and loop code with a tiny model), which can signal itself at an exact step.
"""

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
from cxrjax.train import classifier, classifier_run, diffusion_run, optim
from cxrjax.train import diffusion as ddpm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "tests", "faults", "toy_trainer.py")
# Two processes sum gradients and batch statistics (gloo all-reduce) in another order than one
# process does; after the tiny run's steps the state differs by float32 rounding, up to 1.2e-5
# absolute on a conv kernel entry of 1.2e-3 (Adam's normalised step amplifies rounding where
# gradients are near zero; the data order of 2026-12-03; an earlier order gave 7e-6). A wrong
# batch split, batch statistics from one shard, or a lost gradient shard moves the same values
# by 1e-2 or more.
FLOAT_ORDER_RTOL, FLOAT_ORDER_ATOL = 1e-4, 5e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        # The settings conftest gives this process: fast compiles and the shared compile cache.
        JAX_DISABLE_MOST_OPTIMIZATIONS="true",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    )


def _train_command(workdir, data_dir, *extra, job="classifier"):
    return [
        sys.executable, "-m", f"launch.train_{job}", f"--config=configs/{job}.py:tiny",
        f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *extra,
    ]  # fmt: skip


def _launch(command_fn, num_processes, devices_each, **popen):
    """Starts `command_fn(*flags)` as one process, or as N processes over localhost gloo."""
    if num_processes == 1:
        return [subprocess.Popen(command_fn(), env=_env(devices_each), **popen)]
    port = _free_port()
    return [
        subprocess.Popen(
            command_fn(
                f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
                f"--process_id={i}",
            ),
            env=_env(devices_each), **popen,
        )
        for i in range(num_processes)
    ]  # fmt: skip


def _wait(processes, timeout=600) -> list[str]:
    outputs = []
    for process in processes:
        output, _ = process.communicate(timeout=timeout)
        assert process.returncode == 0, output[-3000:]
        outputs.append(output)
    return outputs


POPEN = dict(cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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
        [h["train/loss"] for h in results[1]["history"]], rel=FLOAT_ORDER_RTOL, abs=FLOAT_ORDER_ATOL
    )
    for a, b in zip(_flatten(_params(single)), _flatten(_params(multi)), strict=True):
        np.testing.assert_allclose(a, b, rtol=FLOAT_ORDER_RTOL, atol=FLOAT_ORDER_ATOL)
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


def _ddpm_state(workdir):
    """The final DDPM state, restored onto this process's devices from a config-built target."""
    config = classifier_run.load_run_config(str(workdir))
    model = ddpm.make_model(config.model, 2)
    tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
    size = config.data.resolution
    init = functools.partial(ddpm.init_state, model, tx, image_shape=(size, size, 1))
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    target = checkpoint_lib.abstract_like(abstract, parallel.replicated(parallel.make_mesh()))
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    state, _ = ckpt.restore(ckpt.latest_step(), target)
    ckpt.close()
    return jax.device_get(state)


@pytest.mark.slow
def test_ddpm_two_processes_equal_one_process(shipped_data_dir, tmp_path):
    from configs import ddpm as ddpm_configs
    from cxrjax.data import builders

    # Prepared here: each process of a run would otherwise build the 16 px variant at once.
    builders.prepare("pneumonia_mnist", data_dir=shipped_data_dir, resolution=16)
    single, multi = tmp_path / "single", tmp_path / "multi"
    workers = _launch(
        lambda *f: _train_command(
            multi, shipped_data_dir, "--config.train.sample_every=0", "--config.sample.steps=2",
            "--config.train.checkpoint_every=0", *f, job="ddpm",
        ),
        2, 2, **POPEN,
    )  # fmt: skip
    # The reference in this process (4 devices, the same compile settings), meanwhile.
    config = ddpm_configs.get_config("tiny")
    config.data.data_dir = shipped_data_dir
    config.train.update(sample_every=0, checkpoint_every=0)  # saves cost seconds here
    config.sample.steps = 2
    diffusion_run.train_and_evaluate(config, str(single))
    _wait(workers)
    results = [json.loads((d / "results.json").read_text()) for d in (single, multi)]
    assert [r["device"]["process_count"] for r in results] == [1, 2]
    assert [r["device"]["device_count"] for r in results] == [4, 4]
    assert results[0]["losses"] == pytest.approx(
        results[1]["losses"], rel=FLOAT_ORDER_RTOL, abs=FLOAT_ORDER_ATOL
    )
    assert len(results[0]["losses"]) == 2  # steps 2 and 4
    for a, b in zip(
        jax.tree.leaves(_ddpm_state(single)), jax.tree.leaves(_ddpm_state(multi)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=FLOAT_ORDER_RTOL, atol=FLOAT_ORDER_ATOL)
    # The EMA sample grid from fixed noise: the same picture.
    grid = os.path.join("samples", f"step_{results[0]['num_steps']:06d}.png")
    assert (single / grid).read_bytes() == (multi / grid).read_bytes()


def _toy(workdir, *args):
    return lambda *f: [sys.executable, TOY, f"--workdir={workdir}", *args, *f]


def _toy_result(output) -> dict:
    line = [x for x in output.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def _toy_params(workdir):
    with np.load(workdir / "params.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def toy_straight(tmp_path_factory):
    """12 uninterrupted toy steps on one process with 2 devices: the reference."""
    workdir = tmp_path_factory.mktemp("toy_straight")
    _wait(_launch(_toy(workdir), 1, 2, **POPEN))
    return _toy_params(workdir)


def _assert_toy_equal(workdir, reference):
    got = _toy_params(workdir)
    for key, value in reference.items():
        np.testing.assert_allclose(got[key], value, atol=1e-6, err_msg=key)


def test_signal_to_one_process_stops_both_at_the_same_step_and_one_process_resumes(
    tmp_path, toy_straight
):
    # Process 0 gets SIGINT while step 5 runs; the processes agree at the next log step (6).
    outputs = _wait(_launch(_toy(tmp_path, "--signal_at=5", "--signal=SIGINT"), 2, 1, **POPEN))
    assert [_toy_result(o) for o in outputs] == [
        {"step": 6, "start_step": 0, "preempted": True}
    ] * 2
    data = tmp_path / "checkpoints" / "6" / "data"
    assert (data / "process_0-of-2.json").exists() and (data / "process_1-of-2.json").exists()
    # A 2-process checkpoint resumes on one process (2 local devices), data position included.
    (output,) = _wait(_launch(_toy(tmp_path), 1, 2, **POPEN))
    assert _toy_result(output) == {"step": 12, "start_step": 6, "preempted": False}
    assert "its data position carries over to 1" in output
    _assert_toy_equal(tmp_path, toy_straight)


def test_one_process_checkpoint_resumes_on_two_processes(tmp_path, toy_straight):
    (output,) = _wait(_launch(_toy(tmp_path, "--stop_at=4"), 1, 2, **POPEN))
    assert _toy_result(output)["step"] == 4
    outputs = _wait(_launch(_toy(tmp_path), 2, 1, **POPEN))
    assert [_toy_result(o) for o in outputs] == [
        {"step": 12, "start_step": 4, "preempted": False}
    ] * 2
    _assert_toy_equal(tmp_path, toy_straight)


_PREPARE = """
import sys
from cxrjax import parallel
from cxrjax.data import builders
parallel.initialize(sys.argv[1], 2, int(sys.argv[2]))
source, spec = builders.load("pneumonia_mnist", "train", data_dir=sys.argv[3], resolution=12)
print("RECORDS", len(source), spec.resolution)
"""


def test_two_processes_prepare_one_dataset_without_colliding(tmp_path):
    # Both processes of a run ask for a dataset nobody has built yet: process 0 builds it, the
    # other waits and reads it (before, both wrote the same directory and one crashed).
    port = _free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _PREPARE, f"localhost:{port}", str(i), str(tmp_path)],
            env=_env(1),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=240) for w in workers]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-2000:]
        assert "RECORDS 2428 12" in out
