r"""Trains and evaluates the DenseNet classifier.

  python -m launch.train_classifier --config=configs/classifier.py:pneumonia_mnist \
      --workdir=/tmp/cls [--config.optim.lr=3e-4 ...]

Writes to the workdir: config.json, metrics.jsonl, tensorboard/, checkpoints/, and at the end
results.json (val + test metrics with CIs), results.md and roc.png. Re-running the same command
on the same workdir resumes from the last checkpoint.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from cxrjax.train import classifier_run
from launch import common

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (:PRESET).", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it has checkpoints).")
flags.mark_flags_as_required(["config", "workdir"])
WORKDIR_OPTIONS = common.define_workdir_flags()


def main(argv):
    del argv
    common.setup()
    common.run_job(
        lambda: classifier_run.train_and_evaluate(CONFIG.value, WORKDIR.value, **WORKDIR_OPTIONS()),
        lambda results: {
            "workdir": WORKDIR.value,
            "test": {k: results["test"].get(k) for k in ("auc", "accuracy", "f1")},
        },
        validate=lambda: common.validate_training(
            classifier_run, CONFIG.value, WORKDIR.value, WORKDIR_OPTIONS()
        ),
    )


if __name__ == "__main__":
    common.main_entry(main)
