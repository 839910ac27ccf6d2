"""Faults that need a real process: kill -9 mid-save, SIGINT/SIGTERM, a failed save.

Each case runs `toy_trainer.py` (the shared pipeline, checkpoint and loop code with a tiny
model) as a process with 2 fake devices, injects the fault, and checks the exit status, the
message, what is on disk, and that re-running the same command ends exactly where an
uninterrupted run does.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import toy_trainer

TOY = os.path.abspath(toy_trainer.__file__)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(TOY)))


def run_toy(workdir, *args, timeout=180):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    return subprocess.run(
        [sys.executable, TOY, f"--workdir={workdir}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def summary(done) -> dict:
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def steps_on_disk(workdir) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def params(workdir) -> dict:
    with np.load(os.path.join(workdir, "params.npz")) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 12-step run: the reference every interrupted run must end at."""
    workdir = tmp_path_factory.mktemp("straight")
    done = run_toy(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"params": params(workdir), "losses": toy_trainer.read_losses(workdir)}


def assert_same_run(workdir, straight):
    got = params(workdir)
    for key, value in straight["params"].items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    # Steps logged twice (before the fault and again after the resume) must agree, and with
    # the uninterrupted run: randomness depends only on (seed, step, example).
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        assert row["train/loss"] == straight["losses"][row["step"]], row


def test_kill_during_async_save_resumes_from_the_last_committed_step(tmp_path, straight):
    # SIGKILL at the instant step 8 would be committed: every byte of it is written, but the
    # folder still has its temporary name.
    killed = run_toy(tmp_path, "--kill_at_commit=8")
    assert killed.returncode == -9, killed.stderr[-3000:]
    on_disk = steps_on_disk(tmp_path)
    assert "4" in on_disk and "8" not in on_disk
    assert any(name.startswith("8.orbax-checkpoint-tmp") for name in on_disk), on_disk

    resumed = run_toy(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary(resumed) == {"step": 12, "start_step": 4, "preempted": False}
    assert "ignoring the uncommitted checkpoint of step 8" in resumed.stderr
    # The half-written step was dropped and step 8 written again (retention keeps 2).
    assert steps_on_disk(tmp_path) == ["12", "8"]
    assert_same_run(tmp_path, straight)


def test_sigint_saves_the_current_step_exits_0_and_the_same_command_resumes(tmp_path, straight):
    # SIGTERM through the real classifier CLI: tests/train/test_classifier.py; the handler is
    # the same PreemptionGuard for both signals.
    signal_name = "SIGINT"
    stopped = run_toy(tmp_path, "--signal_at=5", f"--signal={signal_name}")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert summary(stopped) == {"step": 5, "start_step": 0, "preempted": True}
    assert f"preempted ({signal_name}) at step 5" in stopped.stderr
    assert "re-run the same command to resume" in stopped.stdout
    assert steps_on_disk(tmp_path) == ["4", "5"]  # committed before the exit

    resumed = run_toy(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary(resumed) == {"step": 12, "start_step": 5, "preempted": False}
    assert_same_run(tmp_path, straight)


@pytest.mark.parametrize("failing_step", [8, 12])
def test_a_failed_save_exits_nonzero_naming_it(tmp_path, failing_step):
    # 8: the background commit fails while training goes on, and surfaces at the next save;
    # 12: the final save fails, and surfaces when the run waits for it before exiting.
    failed = run_toy(tmp_path, f"--fail_at_commit={failing_step}")
    assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-3000:]
    assert "RESULT" not in failed.stdout
    error = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert error, failed.stderr[-3000:]
    assert f"step {failing_step}" in error[0] and "No space left on device" in error[0]
    assert "the newest committed step is 4" in error[0] or failing_step == 12
    assert failed.stderr.rstrip().splitlines()[-1] == error[0]  # the last word, not a trace
    assert f"{failing_step}" not in steps_on_disk(tmp_path)
