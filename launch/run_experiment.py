r"""Runs the paper's experiment end to end: data, generators, synthesis, classifier arms, report.

  python -m launch.run_experiment --config=configs/experiment.py:demo --workdir=workdirs/demo \
      [--config.seeds=5 --config.scarcity.fraction=0.05 ...]

Writes WORKDIR/results.json, WORKDIR/report.md, WORKDIR/figures/ and one sub-workdir per
sub-run (judge/, pggan/, ddpm/, synthetic/, quality/, cas/, arms/<arm>/seed<k>/, anomaly/).
An edited config on an existing WORKDIR is refused (exit 2) naming the fields that differ.
Re-running the same command skips finished sub-runs and resumes interrupted training;
SIGTERM/SIGINT stop it cleanly (exit 0, "preempted ... re-run the same command to resume").
XLA compilations are cached in WORKDIR/jax_cache (--jax_cache="" turns that off), so a resumed
run compiles less.

On a SLURM cluster (README, "The experiment on a cluster") each stage's sub-runs go out as jobs:
  --config.launcher.name=submitit --config.launcher.partition=gpu --config.launcher.gpus_per_node=1
Job ids, logs and the job table are under WORKDIR/jobs/; SIGTERM leaves the jobs running and the
same command re-attaches to them. A sub-run failing the same way twice exits 1 with its job id
and its log's last lines.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from launch import common

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (:PRESET).", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes what it holds).")
JAX_CACHE = flags.DEFINE_string(
    "jax_cache", "workdir", 'Persistent XLA compilation cache: "workdir" (WORKDIR/jax_cache), '
    'a directory, or "" for none.'
)  # fmt: skip
flags.mark_flags_as_required(["config", "workdir"])


def _set_compilation_cache() -> None:
    import jax

    if not JAX_CACHE.value or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    path = JAX_CACHE.value
    if path == "workdir":
        path = os.path.join(os.path.abspath(os.path.expanduser(WORKDIR.value)), "jax_cache")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv):
    del argv
    common.setup()
    _set_compilation_cache()
    from cxrjax import experiment
    from cxrjax.experiment import launchers

    def job():
        try:
            return experiment.run(CONFIG.value, WORKDIR.value)
        except experiment.Preempted as stopped:
            logging.warning("%s", stopped)
            print(str(stopped), flush=True)
            return {"finished": False, "step": stopped.where}
        except launchers.SubRunFailed as failed:  # the log's last lines: several lines
            print(f"error: {failed}", file=sys.stderr, flush=True)
            sys.exit(1)

    common.run_job(
        job,
        lambda results: {
            "workdir": WORKDIR.value,
            "report": os.path.join(WORKDIR.value, "report.md"),
            "headroom": (results.get("headroom") or {}).get("test", {}).get("gap"),
            "verdicts": {
                f"{c['arm']} vs {c['reference']}": f"{c['verdict']} (AUC "
                f"{c['paired_t']['mean']:+.3f} per seed, Holm p={c['p_holm']:.3g})"
                for c in results["evaluation"]["comparisons"]
                if c.get("primary")
            },
            "generators_adequate": {
                kind: q["gate"]["adequate"] for kind, q in (results.get("quality") or {}).items()
            },
            "warnings": len(results.get("warnings", [])),
        },
        validate=lambda: experiment.validate(CONFIG.value, WORKDIR.value),
    )


if __name__ == "__main__":
    common.main_entry(main)
