r"""Trains a (class-conditional) DDPM and writes EMA sample grids.

  python -m launch.train_ddpm --config=configs/ddpm.py:pneumonia_mnist --workdir=/tmp/ddpm \
      [--config.train.num_steps=5000 ...]

Writes to the workdir: config.json, metrics.jsonl, tensorboard/, checkpoints/,
samples/step_<NNNNNN>.png and at the end results.json. Re-running the same command on the same
workdir resumes from the last checkpoint.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from cxrjax.train import diffusion_run
from launch import common

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (:PRESET).", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it has checkpoints).")
flags.mark_flags_as_required(["config", "workdir"])
WORKDIR_OPTIONS = common.define_workdir_flags()


def main(argv):
    del argv
    common.setup()
    common.run_job(
        lambda: diffusion_run.train_and_evaluate(CONFIG.value, WORKDIR.value, **WORKDIR_OPTIONS()),
        lambda results: {
            "workdir": WORKDIR.value,
            "final_loss": results["final_loss"],
            "samples": results["samples"][-1:],
            "wall_time_s": results["wall_time_s"],
        },
        validate=lambda: common.validate_training(
            diffusion_run, CONFIG.value, WORKDIR.value, WORKDIR_OPTIONS()
        ),
    )


if __name__ == "__main__":
    common.main_entry(main)
