r"""Trains a progressive GAN (PGGAN) on chest X-rays.

  python -m launch.train_pggan --config=configs/pggan.py:pneumonia_mnist --workdir=/tmp/pggan \
      [--config.schedule.fade_images=20000 ...]

Writes to the workdir: config.json, metrics.jsonl, tensorboard/, checkpoints/, samples/ (one PNG
grid per phase from the EMA generator) and results.json at the end. Re-running the same command
on the same workdir resumes from the last checkpoint (mid-fade included).
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from cxrjax.train import gan_run
from launch import common

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (:PRESET).", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it has checkpoints).")
flags.mark_flags_as_required(["config", "workdir"])
WORKDIR_OPTIONS = common.define_workdir_flags()


def main(argv):
    del argv
    common.setup()
    common.run_job(
        lambda: gan_run.train_and_evaluate(CONFIG.value, WORKDIR.value, **WORKDIR_OPTIONS()),
        lambda results: {
            "workdir": WORKDIR.value,
            **{k: results[k] for k in ("step", "images_seen", "nonfinite_steps", "samples")},
        },
        validate=lambda: common.validate_training(
            gan_run, CONFIG.value, WORKDIR.value, WORKDIR_OPTIONS()
        ),
    )


if __name__ == "__main__":
    common.main_entry(main)
