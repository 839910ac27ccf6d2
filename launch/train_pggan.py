r"""Trains a progressive GAN (PGGAN) on chest X-rays.

  python -m launch.train_pggan --config=configs/pggan.py:pneumonia_mnist --workdir=/tmp/pggan \
      [--config.schedule.fade_images=20000 ...]

Writes to the workdir: config.json, metrics.jsonl, tensorboard/, checkpoints/, samples/ (one PNG
grid per phase from the EMA generator) and results.json at the end. Re-running the same command
on the same workdir resumes from the last checkpoint (mid-fade included).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cxrjax import checkpoint as checkpoint_lib
from cxrjax import config as config_lib
from cxrjax.data import builders
from cxrjax.train import gan_run
from launch import common

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (:PRESET).", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it has checkpoints).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    common.setup()
    try:
        results = gan_run.train_and_evaluate(CONFIG.value, WORKDIR.value)
    except (
        config_lib.ConfigError,
        builders.DatasetError,
        checkpoint_lib.CheckpointError,
        ValueError,
        FileNotFoundError,
    ) as error:
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    if results.get("finished") is False:
        print(f"stopped at step {results['step']}; re-run the same command to resume")
        return
    summary = {k: results[k] for k in ("step", "images_seen", "nonfinite_steps", "samples")}
    print(json.dumps({"workdir": WORKDIR.value, **summary}))


if __name__ == "__main__":
    app.run(main)
