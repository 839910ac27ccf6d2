"""Where an experiment's sub-runs run: in the experiment's process, or as submitit jobs.

`config.launcher.name`: "inline" runs each sub-run in this process, one after another (the
runner's own loop). "submitit" hands each stage's ready sub-runs to submitit (SLURM through its
`AutoExecutor`, or local processes with cluster "local"), waits for them and leaves every
number to the sub-runs' own drivers, so the results equal the inline run's.

Resume: every attempt's job id is in the job table (WORKDIR/jobs/jobs.json, written
atomically). A re-run of the same command re-attaches to jobs still running, skips finished
sub-runs (their results.json) and resubmits failed or preempted ones; each sub-run resumes from
its own Orbax checkpoint (and a SLURM timeout or preemption requeues the job through
submitit's checkpoint hook). A sub-run that fails the same way twice stops the experiment
(`SubRunFailed`) with the job id and its log's last lines. SIGTERM to the experiment leaves
its jobs running: the next invocation re-attaches to them. Logs (stdout, stderr) of every job:
WORKDIR/jobs/logs/<job id>_<task>_log.{out,err}.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import submitit
from absl import logging
from submitit.core import utils as submitit_utils
from submitit.local import local as submitit_local

from cxrjax import config as config_lib
from cxrjax import fileio

NAMES = ("inline", "submitit")
CLUSTERS = ("auto", "local", "slurm")
JOBS_DIR = "jobs"
TABLE_FILE = "jobs.json"
LOG_LINES = 20
# Different failures of one sub-run in a row before the experiment stops anyway (the same
# failure twice stops it at once).
MAX_FAILURES = 4
# What a job that died without a result (SIGKILL, out of memory, a lost node) failed with.
NO_RESULT = "the job ended without a result (killed, out of memory or a lost node)"

RULES: tuple[tuple[str, config_lib.Rule], ...] = (
    ("launcher.name", config_lib.choice(*NAMES)),
    ("launcher.cluster", config_lib.choice(*CLUSTERS)),
    ("launcher.partition", config_lib.text()),
    ("launcher.account", config_lib.text()),
    ("launcher.qos", config_lib.text()),
    ("launcher.nodes", config_lib.integer(ge=1)),
    ("launcher.tasks_per_node", config_lib.integer(ge=1)),
    ("launcher.gpus_per_node", config_lib.integer(ge=0)),
    ("launcher.cpus_per_task", config_lib.integer(ge=0)),
    ("launcher.mem_gb", config_lib.number(ge=0)),
    ("launcher.timeout_min", config_lib.integer(ge=1)),
    ("launcher.array_parallelism", config_lib.integer(ge=1)),
    ("launcher.poll_s", config_lib.number(gt=0)),
)


class SubRunFailed(RuntimeError):
    """A sub-run's job failed the same way twice; the message has the job id and log tail."""


def validate(launcher) -> None:
    """The launcher fields (RULES), and what the chosen cluster cannot do; ConfigError."""
    import ml_collections

    config_lib.check_fields(ml_collections.ConfigDict({"launcher": launcher}), RULES)
    if launcher.name == "submitit":
        cluster = resolve_cluster(launcher.cluster)
        config_lib.check(
            cluster != "local" or launcher.nodes == 1,
            "launcher.nodes",
            f"the local cluster runs on one node, got {launcher.nodes}",
        )
        config_lib.check(
            cluster != "slurm" or shutil.which("srun") is not None,
            "launcher.cluster",
            "'slurm' needs SLURM (srun) on this machine; use 'local' or 'auto'",
        )


def resolve_cluster(cluster: str) -> str:
    """Cluster "auto" -> "slurm" where SLURM's srun exists, else "local" (submitit's choice)."""
    if cluster != "auto":
        return cluster
    return submitit.AutoExecutor.which()


def make(launcher, workdir: str, harmless: Sequence[str]) -> Submitit | None:
    """The launcher of `config.launcher`: None for inline (the runner's own loop).

    Inline is refused while the job table holds jobs not yet seen to end: they may still write
    to their sub-workdirs, and only the submitit launcher re-attaches to them."""
    if launcher.name == "inline":
        table = _read_json(os.path.join(workdir, JOBS_DIR, TABLE_FILE)) or {}
        open_jobs = [
            f"{name}: job {entry['attempts'][-1]['job_id']}"
            for name, entry in table.items()
            if entry["attempts"] and entry["attempts"][-1]["state"] == "submitted"
        ]
        config_lib.check(
            not open_jobs,
            "launcher.name",
            f"'inline', but {len(open_jobs)} job(s) of an earlier submitit run may still run "
            f"({', '.join(open_jobs[:3])}); re-run with --config.launcher.name=submitit to "
            "re-attach to them",
        )
        return None
    return Submitit(launcher, workdir, harmless)


# ----------------------------------------------------------------------------- the job
class SubRunJob(submitit.helpers.Checkpointable):
    """One sub-run as a submitit job: its driver's `train_and_evaluate` in its sub-workdir.

    Checkpointable: on a SLURM timeout or preemption signal submitit calls `checkpoint` (the
    same job, unchanged) and requeues it; the driver then resumes its own Orbax checkpoint.
    """

    def __init__(self, name, kind, sub_workdir, config, harmless, cache: Mapping[str, Any]):
        self.name, self.kind, self.sub_workdir = name, kind, sub_workdir
        self.config = config_lib.to_dict(config)  # plain data: pickles across versions
        self.harmless = tuple(harmless)
        self.cache = dict(cache)

    def __call__(self) -> dict[str, Any]:
        import ml_collections

        start = time.time()
        env = submitit.JobEnvironment()
        logging.set_verbosity(logging.INFO)
        _initialize_distributed(env)
        _set_cache(self.cache)
        if env.global_rank == 0:
            fileio.write_json(
                node_file(env.paths.folder, env.job_id),
                {"name": self.name, "node": socket.gethostname(), "pid": os.getpid(),
                 "started": start, "nodes": list(env.hostnames)},
            )  # fmt: skip
        from cxrjax.experiment import design

        result = design.driver(self.kind).train_and_evaluate(
            ml_collections.ConfigDict(self.config), self.sub_workdir, harmless=self.harmless
        )
        return {
            "finished": result.get("finished") is not False,
            "step": result.get("step"),
            "node": socket.gethostname(),
            "wall_time_s": round(time.time() - start, 2),
        }


def _initialize_distributed(env) -> None:
    """One JAX process per task: SLURM's environment (JAX detects it), or the local job's."""
    from cxrjax import parallel

    if env.num_tasks <= 1:
        return
    if os.environ.get("SLURM_JOB_ID"):
        parallel.initialize()
        return
    port = 20000 + int(str(env.job_id).split("_")[0]) % 20000
    parallel.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=env.num_tasks,
        process_id=env.global_rank,
    )


def _set_cache(cache: Mapping[str, Any]) -> None:
    """The experiment's persistent XLA compilation cache, so jobs compile as little as it."""
    import jax

    for key, value in cache.items():
        if value is not None:
            jax.config.update(key, value)


def node_file(folder, job_id: str) -> str:
    return os.path.join(os.fspath(folder), f"{job_id}_node.json")


# ----------------------------------------------------------------------------- submitit
class Submitit:
    """Submits, waits for and resumes one experiment's sub-run jobs (see the module doc)."""

    def __init__(self, launcher, workdir: str, harmless: Sequence[str]):
        self.launcher = launcher
        self.cluster = resolve_cluster(launcher.cluster)
        self.folder = os.path.join(workdir, JOBS_DIR, "logs")
        self.table_path = os.path.join(workdir, JOBS_DIR, TABLE_FILE)
        self.harmless = tuple(harmless)
        self.table: dict[str, Any] = _read_json(self.table_path) or {}
        self.executor = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        self.executor.update_parameters(**executor_parameters(launcher, self.cluster))

    # -- the table
    def _save(self) -> None:
        fileio.write_json(self.table_path, self.table)

    def _attempts(self, name: str) -> list[dict[str, Any]]:
        return self.table.setdefault(name, {"attempts": []})["attempts"]

    # -- jobs
    def _job(self, attempt: Mapping[str, Any]):
        """A job re-created from its id (and the log folder), as another invocation left it."""
        tasks = list(range(int(attempt.get("tasks", 1))))
        if attempt["cluster"] == "local":
            return _LocalJob(self.folder, attempt["job_id"], tasks=tasks)
        return submitit.SlurmJob(self.folder, attempt["job_id"], tasks=tasks)

    def _submit(self, names: Sequence[str], runs) -> dict[str, Any]:
        """One job array for `names` (SLURM throttles it to array_parallelism)."""
        import jax

        cache = {
            "jax_compilation_cache_dir": jax.config.jax_compilation_cache_dir,
            "jax_persistent_cache_min_compile_time_secs": (
                jax.config.jax_persistent_cache_min_compile_time_secs
            ),
        }
        fns = [SubRunJob(name, *runs[name], self.harmless, cache) for name in names]
        # Without the experiment's own SLURM / submitit variables when it runs inside a job.
        with submitit.helpers.clean_env():
            jobs = self.executor.submit_array(fns)
        for name, job in zip(names, jobs, strict=True):
            self._attempts(name).append(
                {"job_id": str(job.job_id), "cluster": self.cluster, "state": "submitted",
                 "submitted": time.time(), "tasks": job.num_tasks}
            )  # fmt: skip
            logging.info("[jobs] %s: submitted job %s (%s)", name, job.job_id, self.cluster)
        self._save()
        return dict(zip(names, jobs, strict=True))

    def _reattach(self, name: str):
        """The job of `name` a previous invocation left unsettled, else None."""
        attempts = self.table.get(name, {}).get("attempts", [])
        if not attempts or attempts[-1]["state"] != "submitted":
            return None
        logging.info("[jobs] %s: re-attached to job %s", name, attempts[-1]["job_id"])
        return self._job(attempts[-1])

    def run(self, names: Sequence[str], runs, stop) -> dict[str, Mapping[str, Any]]:
        """Runs one stage's ready sub-runs `names` as jobs; returns their results.json."""
        # Unsettled jobs of an earlier invocation first (also of sub-runs that finished since:
        # their table entry is settled then); finished sub-runs are skipped.
        running = {name: job for name in names if (job := self._reattach(name)) is not None}
        queue = [n for n in names if n not in running and not _finished(runs[n][1])]
        for name in names:
            if name not in running and name not in queue:
                logging.info("[jobs] %s: skip (finished) -> %s", name, runs[name][1])
        limit = int(self.launcher.array_parallelism)
        while queue or running:
            # The local executor starts whatever it is given at once: hand it at most
            # array_parallelism jobs; SLURM gets the whole array and throttles it itself.
            room = len(queue) if self.cluster != "local" else limit - len(running)
            if queue and room > 0:
                running.update(self._submit(queue[:room], runs))
                queue = queue[room:]
            for name, job in list(running.items()):
                if job.done():
                    del running[name]
                    if not self._settle(name, job, runs[name][1]):
                        queue.append(name)
            stop.check(
                f"while {len(running)} job(s) ran (they go on: re-run the same command to "
                "re-attach to them)"
            )
            if queue or running:
                time.sleep(float(self.launcher.poll_s))
        return {name: _read_json(os.path.join(runs[name][1], "results.json")) for name in names}

    def _settle(self, name: str, job, sub_workdir: str) -> bool:
        """Records how `job` ended; True when the sub-run is finished, False to resubmit.
        Raises SubRunFailed when it failed the same way as an earlier attempt."""
        attempt = self._attempts(name)[-1]
        info = _read_json(node_file(self.folder, attempt["job_id"])) or {}
        attempt.update(node=info.get("node"), ended=time.time())
        if self.cluster == "local":  # no shared file system to wait for: a dead job has none
            job._results_timeout_s = 2
        try:
            result = job.results()[0]
        except (submitit_utils.UncompletedJobError, submitit_utils.FailedJobError) as e:
            result, failure = None, _failure(e)
        else:
            failure = None if _finished(sub_workdir) or not result["finished"] else (
                "the job returned but the sub-run has no results.json"
            )  # fmt: skip
        if result is not None and not result["finished"]:
            attempt.update(state="preempted", wall_time_s=result.get("wall_time_s"))
            logging.warning("[jobs] %s: job %s was preempted: resubmitting (it resumes from "
                            "its checkpoint)", name, attempt["job_id"])  # fmt: skip
            self._save()
            return False
        if failure is None:
            attempt.update(state="finished", wall_time_s=result.get("wall_time_s"))
            logging.info("[jobs] %s: job %s finished on %s in %.0f s", name, attempt["job_id"],
                         attempt["node"], result.get("wall_time_s") or 0.0)  # fmt: skip
            self._save()
            return True
        earlier = [a.get("failure") for a in self._attempts(name)[:-1] if a["state"] == "failed"]
        attempt.update(state="failed", failure=failure)
        self._save()
        log = _log_path(self.folder, attempt["job_id"])
        if failure in earlier or len(earlier) + 1 >= MAX_FAILURES:
            raise SubRunFailed(
                f"{name}: job {attempt['job_id']} failed ({failure}), as an earlier attempt "
                f"did; the experiment stops. Last lines of {log}:\n{_tail(log)}"
            )
        logging.warning("[jobs] %s: job %s failed (%s): resubmitting; log %s", name,
                        attempt["job_id"], failure, log)  # fmt: skip
        return False

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per sub-run: its last job's id, node, wall time and exit state, and attempts."""
        out = {}
        for name, entry in self.table.items():
            last = entry["attempts"][-1]
            out[name] = {
                "job_id": last["job_id"],
                "node": last.get("node"),
                "wall_time_s": last.get("wall_time_s"),
                "state": last["state"],
                "attempts": len(entry["attempts"]),
                "cluster": last["cluster"],
            }
        return out


def executor_parameters(launcher, cluster: str) -> dict[str, Any]:
    """submitit's parameters from the config (SLURM-only ones only for SLURM)."""
    params: dict[str, Any] = {
        "name": "cxrjax",
        "timeout_min": int(launcher.timeout_min),
        "nodes": int(launcher.nodes),
        "tasks_per_node": int(launcher.tasks_per_node),
    }
    for field in ("gpus_per_node", "cpus_per_task", "mem_gb"):
        if launcher[field]:
            params[field] = launcher[field]
    if cluster == "slurm":
        params["slurm_array_parallelism"] = int(launcher.array_parallelism)
        for field in ("partition", "account", "qos"):
            if launcher[field]:
                params[f"slurm_{field}"] = launcher[field]
    return params


def _controller_alive(job_id: str) -> bool:
    """Whether the local job's controller process (pid = job id) still runs."""
    try:
        with open(f"/proc/{int(job_id)}/cmdline", "rb") as f:
            return b"submitit.local._local" in f.read()
    except (OSError, ValueError):
        return False


class _LocalJob(submitit_local.LocalJob):
    """A local job re-created from its id by a later invocation: running while its controller
    (pid = job id) is alive (submitit's LocalJob knows only a Popen handle it started)."""

    def get_info(self, mode: str = "force") -> dict[str, str]:
        if self._process is not None:
            return super().get_info(mode)
        if self.paths.result_pickle.exists():
            return {"jobState": "FINISHED"}
        return {"jobState": "RUNNING" if _controller_alive(self.job_id) else "INTERRUPTED"}


def _failure(error: BaseException) -> str:
    """A failure's signature: the exception line of the job's traceback (the same for the same
    failure, whatever the job id), or NO_RESULT for a job that died without one."""
    if not isinstance(error, submitit_utils.FailedJobError):  # its base class: no result
        return NO_RESULT
    # submitit's message: a header, the traceback between two dashed lines, then log paths.
    text = str(error)
    parts = text.split("----------------------")
    trace = parts[1] if len(parts) >= 3 else text
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def _log_path(folder: str, job_id: str) -> str:
    return os.path.join(folder, f"{job_id}_0_log.err")


def _tail(path: str, lines: int = LOG_LINES) -> str:
    try:
        return "\n".join(fileio.read_text(path).splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _finished(sub_workdir: str) -> bool:
    return os.path.exists(os.path.join(sub_workdir, "results.json"))


def _read_json(path: str) -> Any:
    import json

    try:
        return json.loads(fileio.read_text(path))
    except (OSError, ValueError):
        return None
