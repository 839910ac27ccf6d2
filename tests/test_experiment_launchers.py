"""The experiment through submitit on the local cluster, 2 jobs at once (#18): the same numbers
as the inline run; a job killed with SIGKILL is resubmitted and resumes from its checkpoint;
SIGTERM to the experiment leaves its jobs running and the same command re-attaches to them.

Preset launcher_smoke (two real-data arms, 2 seeds: four classifier sub-runs in stages 1 and
3). One inline run is the module's reference; the interruption tests start from a copy of its
stage-1 sub-runs, so only stage 3 runs as jobs there.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from cxrjax import experiment
from cxrjax.experiment import launchers
from tests import test_experiment as helpers

SUBMITIT = (
    "--config.launcher.name=submitit",
    "--config.launcher.cluster=local",
    "--config.launcher.array_parallelism=2",
    "--config.launcher.poll_s=0.2",
)
STAGE_3 = ("arms/oversampled/seed0", "arms/oversampled/seed1")
KILLED = "arms/oversampled/seed0"


def _command(workdir, data_dir, *extra):
    command = [c.replace(":smoke", ":launcher_smoke") for c in helpers._command(workdir, data_dir)]
    return [*command, *extra]


def _run(command, timeout=600):
    return subprocess.run(
        command, cwd=helpers.REPO, env=helpers._env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _table(workdir):
    path = workdir / launchers.JOBS_DIR / launchers.TABLE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _node(workdir, job_id):
    path = launchers.node_file(workdir / launchers.JOBS_DIR / "logs", job_id)
    return json.loads(open(path).read()) if os.path.exists(path) else None


def _alive(pid, marker):
    """Whether `pid` runs a submitit process (`marker` in its command line)."""
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            return marker in f.read()
    except (OSError, ValueError, TypeError):
        return False


def _stop_jobs(workdir):
    """Ends what a failed test left running: each job's task and controller, by pid."""
    for entry in _table(workdir).values():
        for attempt in entry["attempts"]:
            task = (_node(workdir, attempt["job_id"]) or {}).get("pid")
            for pid, marker in ((task, b"submitit"), (attempt["job_id"], b"submitit.local")):
                if _alive(pid, marker):
                    os.kill(int(pid), signal.SIGKILL)


def _wait_for(condition, what, timeout=300, every=0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _assert_same_numbers(results, expected):
    assert experiment.check_results(results) == []
    assert set(results["arms"]) == set(expected["arms"])
    for arm in expected["arms"]:
        got, want = results["arms"][arm]["per_seed"], expected["arms"][arm]["per_seed"]
        for row_got, row_want in zip(got, want, strict=True):
            assert row_got["selected_step"] == row_want["selected_step"]
            assert helpers._flat(row_got["test"]) == pytest.approx(
                helpers._flat(row_want["test"]), rel=1e-6
            )
    for got, want in zip(
        results["evaluation"]["comparisons"], expected["evaluation"]["comparisons"], strict=True
    ):
        assert got["p_holm"] == pytest.approx(want["p_holm"], rel=1e-6)


@pytest.fixture(scope="module")
def inline_run(shipped_data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("launchers") / "inline"
    done = _run(_command(workdir, shipped_data_dir))
    assert done.returncode == 0, done.stderr[-5000:]
    assert not (workdir / launchers.JOBS_DIR).exists()  # inline: no jobs
    return {"workdir": workdir, "results": json.loads((workdir / "results.json").read_text())}


def test_submitit_local_two_at_once_equals_inline(inline_run, shipped_data_dir, tmp_path):
    workdir = tmp_path / "submitit"
    try:
        done = _run(_command(workdir, shipped_data_dir, *SUBMITIT))
    finally:
        _stop_jobs(workdir)
    assert done.returncode == 0, done.stderr[-5000:]
    results = json.loads((workdir / "results.json").read_text())
    _assert_same_numbers(results, inline_run["results"])
    table = _table(workdir)
    assert set(table) == set(results["jobs"]) and len(table) == 4
    spans = []
    for name, entry in table.items():
        (attempt,) = entry["attempts"]
        assert attempt["state"] == "finished" and attempt["node"], (name, attempt)
        assert results["jobs"][name]["job_id"] == attempt["job_id"]
        spans.append((attempt["submitted"], attempt["ended"]))
    # Two jobs ran at once, never more (array_parallelism 2).
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert overlap == 2, spans
    # Each job ran in a process of its own.
    assert len({_node(workdir, e["attempts"][0]["job_id"])["pid"] for e in table.values()}) == 4
    report = (workdir / "report.md").read_text()
    assert "## Jobs" in report
    assert all(f"| {name} | {entry['attempts'][0]['job_id']} |" in report
               for name, entry in table.items())  # fmt: skip
    logs = workdir / launchers.JOBS_DIR / "logs"
    assert all((logs / f"{e['attempts'][0]['job_id']}_0_log.err").is_file() for e in table.values())


@pytest.fixture(scope="module")
def interrupted_run(inline_run, shipped_data_dir, tmp_path_factory):
    """Stage 3 as jobs: one job SIGKILLed once its step-12 checkpoint exists, the experiment
    SIGTERMed once the resubmitted job has started, then the same command again."""
    source = inline_run["workdir"]
    workdir = tmp_path_factory.mktemp("launchers") / "interrupted"
    shutil.copytree(source, workdir, ignore=helpers._top_level(
        "results.json", "report.md", "figures", "timings.json"))  # fmt: skip
    shutil.rmtree(workdir / "arms" / "oversampled")
    command = _command(workdir, shipped_data_dir, *SUBMITIT)
    output = workdir.parent / "first.log"
    checkpoints = workdir / KILLED / "checkpoints"
    try:
        with open(output, "w") as out:  # a file: the jobs inherit it and outlive the run
            proc = subprocess.Popen(command, cwd=helpers.REPO, env=helpers._env(), stdout=out,
                                    stderr=subprocess.STDOUT, text=True)  # fmt: skip
            _wait_for(lambda: checkpoints.is_dir() and any(
                p.name.isdigit() for p in checkpoints.iterdir()), "a checkpoint")  # fmt: skip
            saved = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
            first = _table(workdir)[KILLED]["attempts"][0]["job_id"]
            os.kill(_wait_for(lambda: _node(workdir, first), "the job's pid")["pid"],
                    signal.SIGKILL)  # fmt: skip
            assert not (workdir / KILLED / "results.json").exists(), "killed after it finished"
            attempts = _wait_for(
                lambda: (
                    len(_table(workdir)[KILLED]["attempts"]) == 2
                    and _node(workdir, _table(workdir)[KILLED]["attempts"][1]["job_id"])
                    and _table(workdir)[KILLED]["attempts"]
                ),
                "the resubmitted job to start",
            )
            assert proc.poll() is None, "the experiment ended before it was interrupted"
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
        first_output = output.read_text()
        running = {
            name: entry["attempts"][-1]
            for name, entry in _table(workdir).items()
            if entry["attempts"][-1]["state"] == "submitted"
        }
        finished_first = (workdir / "results.json").exists()
        resumed = _run(command)
    finally:
        _stop_jobs(workdir)
    return {
        "workdir": workdir, "saved": saved, "attempts": attempts, "first": proc.returncode,
        "first_output": first_output, "running": running, "resumed": resumed,
        "finished_first": finished_first,
    }  # fmt: skip


def test_killed_job_is_resubmitted_and_resumes_from_its_checkpoint(inline_run, interrupted_run):
    run = interrupted_run
    killed, again = run["attempts"]
    assert killed["state"] == "failed" and killed["failure"] == launchers.NO_RESULT
    assert again["job_id"] != killed["job_id"]
    assert run["saved"] < 24, "the job was killed after its last step"  # mid-way
    log = run["workdir"] / launchers.JOBS_DIR / "logs" / f"{again['job_id']}_0_log.err"
    assert f"resumed from step {run['saved']} in" in log.read_text()
    assert run["resumed"].returncode == 0, run["resumed"].stderr[-5000:]
    results = json.loads((run["workdir"] / "results.json").read_text())
    _assert_same_numbers(results, inline_run["results"])
    final = _table(run["workdir"])[KILLED]["attempts"]
    assert [a["state"] for a in final] == ["failed", "finished"]


def test_sigterm_to_the_experiment_then_the_same_command_reattaches(inline_run, interrupted_run):
    run = interrupted_run
    assert run["first"] == 0, run["first_output"][-5000:]
    assert "preempted (SIGTERM)" in run["first_output"]
    assert not run["finished_first"]
    assert KILLED in run["running"]  # its resubmitted job was running at the SIGTERM
    resumed = run["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    table = _table(run["workdir"])
    for name, attempt in run["running"].items():
        # The same job, re-attached: not resubmitted, and it finished.
        assert f"{name}: re-attached to job {attempt['job_id']}" in resumed.stderr
        assert table[name]["attempts"][-1]["job_id"] == attempt["job_id"]
        assert table[name]["attempts"][-1]["state"] == "finished"
    assert "submitted job" not in resumed.stderr
    results = json.loads((run["workdir"] / "results.json").read_text())
    _assert_same_numbers(results, inline_run["results"])
    assert set(results["jobs"]) == set(STAGE_3)


def _launch(overrides, workdir, capsys):
    """run_experiment's parse + validate path in-process: (exit code or 0, stderr)."""
    from absl import flags
    from ml_collections import config_flags

    from launch import common

    argv = ["prog", "--config=configs/experiment.py:launcher_smoke", f"--workdir={workdir}",
            *overrides]  # fmt: skip
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flags.DEFINE_string("workdir", None, "workdir", flag_values=flag_values)
    capsys.readouterr()
    cwd = os.getcwd()
    os.chdir(helpers.REPO)
    try:
        common.parse_flags(argv, flag_values)
        config = flag_values["config"].value
        common.run_job(
            lambda: {"finished": False, "step": "validated"},
            lambda results: results,
            validate=lambda: experiment.validate(config, str(workdir)),
        )
    except SystemExit as stop:
        return stop.code, capsys.readouterr().err
    finally:
        os.chdir(cwd)
    return 0, capsys.readouterr().err


@pytest.mark.parametrize("field", [field for field, _ in launchers.RULES])
def test_bad_launcher_values_exit_2_with_one_line_naming_the_field(field, tmp_path, capsys):
    rule = dict(launchers.RULES)[field]
    for bad in rule.bad_values():
        code, err = _launch([f"--config.{field}={bad}"], tmp_path / "wd", capsys)
        assert code == 2 and err.startswith("error:") and field in err, (bad, err)
        assert err.strip().count("\n") == 0, err
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("--config.launcher.nodes=2",), "launcher.nodes: the local cluster runs on one node"),
        (("--config.launcher.cluster=slurm",), "launcher.cluster: 'slurm' needs SLURM"),
    ],
)
def test_what_the_cluster_cannot_do_is_refused(overrides, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    overrides = ("--config.launcher.name=submitit", "--config.launcher.cluster=local", *overrides)
    code, err = _launch(overrides, tmp_path / "wd", capsys)
    assert code == 2 and message in err, err


def test_slurm_parameters_reach_the_sbatch_script(tmp_path, monkeypatch):
    """The config's SLURM fields as sbatch directives (a stand-in srun: no cluster here)."""
    import submitit

    import configs.experiment as experiment_configs

    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}:{os.environ['PATH']}")
    launcher = experiment_configs.get_config("kermany_binary_128").launcher
    launcher.update(name="submitit", cluster="slurm", partition="gpu", account="lab",
                    gpus_per_node=4, nodes=2, tasks_per_node=1, timeout_min=600)  # fmt: skip
    launchers.validate(launcher)
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    executor.update_parameters(**launchers.executor_parameters(launcher, "slurm"))
    script = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--account=lab", "--gpus-per-node=4", "--nodes=2",
                 "--ntasks-per-node=1", "--time=600", "--signal=USR2"):  # fmt: skip
        assert f"#SBATCH {line}" in script, script
    assert executor._executor.parameters["array_parallelism"] == launcher.array_parallelism


class _FailedJob:
    """A finished job that raised `message` (what submitit's job.results() raises)."""

    def __init__(self, job_id, message):
        self.job_id, self.message = job_id, message
        self._results_timeout_s = 15

    def results(self):
        from submitit.core import utils

        raise utils.FailedJobError(  # submitit's layout: header, trace, the job's own paths
            "Job (task=0) failed during processing with trace:\n----------------------\n"
            f"Traceback (most recent call last):\n  ...\n{self.message}\n"
            "----------------------\nYou can check full logs at paths:\n"
            f"  - /logs/{self.job_id}_0_log.err\n  - /logs/{self.job_id}_0_log.out"
        )


def test_a_sub_run_failing_the_same_way_twice_stops_with_job_id_and_log(tmp_path):
    launcher = launchers.Submitit(_launcher_config(), str(tmp_path), harmless=())
    logs = tmp_path / launchers.JOBS_DIR / "logs"
    for job_id in ("11", "12", "13"):
        (logs / f"{job_id}_0_log.err").write_text(f"line 1\nlast line of job {job_id}\n")
    name, sub_workdir = "arms/x/seed0", str(tmp_path / "x")
    attempts = launcher._attempts(name)
    attempts.append({"job_id": "11", "cluster": "local", "state": "submitted"})
    assert not launcher._settle(name, _FailedJob("11", "ValueError: one"), sub_workdir)  # resubmit
    attempts.append({"job_id": "12", "cluster": "local", "state": "submitted"})
    assert not launcher._settle(name, _FailedJob("12", "OSError: another"), sub_workdir)
    attempts.append({"job_id": "13", "cluster": "local", "state": "submitted"})
    with pytest.raises(launchers.SubRunFailed) as failed:
        launcher._settle(name, _FailedJob("13", "ValueError: one"), sub_workdir)
    assert "job 13 failed (ValueError: one)" in str(failed.value)
    assert str(failed.value).endswith("line 1\nlast line of job 13")
    table = _table(tmp_path)[name]["attempts"]
    assert [a["state"] for a in table] == ["failed"] * 3


def _launcher_config():
    import configs.experiment as experiment_configs

    launcher = experiment_configs.launcher_config()
    launcher.update(name="submitit", cluster="local")
    return launcher


def test_inline_is_refused_while_jobs_of_a_submitit_run_may_still_run(tmp_path):
    from cxrjax import config as config_lib

    launcher = launchers.Submitit(_launcher_config(), str(tmp_path), harmless=())
    launcher._attempts("arms/x/seed0").append(
        {"job_id": "77", "cluster": "local", "state": "submitted"}
    )
    launcher._save()
    inline = _launcher_config()
    inline.name = "inline"
    with pytest.raises(config_lib.ConfigError, match="arms/x/seed0: job 77"):
        launchers.make(inline, str(tmp_path), ())
    launcher.table["arms/x/seed0"]["attempts"][-1]["state"] = "finished"
    launcher._save()
    assert launchers.make(inline, str(tmp_path), ()) is None
