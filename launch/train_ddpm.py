r"""Trains a (class-conditional) DDPM and writes EMA sample grids.

  python -m launch.train_ddpm --config=configs/ddpm.py:pneumonia_mnist --workdir=/tmp/ddpm \
      [--config.train.num_steps=5000 ...]

Writes to the workdir: config.json, metrics.jsonl, tensorboard/, checkpoints/,
samples/step_XXXXXX.png and at the end results.json. Re-running the same command on the same
workdir resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cxrjax import checkpoint as checkpoint_lib
from cxrjax import config as config_lib
from cxrjax.data import builders
from cxrjax.train import diffusion_run
from launch import common

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (:PRESET).", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it has checkpoints).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    common.setup()
    try:
        results = diffusion_run.train_and_evaluate(CONFIG.value, WORKDIR.value)
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
    summary = {
        "workdir": WORKDIR.value,
        "final_loss": results["final_loss"],
        "samples": results["samples"][-1:],
        "wall_time_s": results["wall_time_s"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
