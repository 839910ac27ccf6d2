r"""Anomaly detection: trains the f-AnoGAN encoder (or uses a DDPM as is) and evaluates it.

  python -m launch.train_anomaly --config=configs/anomaly.py:pneumonia_mnist \
      --workdir=workdirs/anomaly_fanogan --config.generator_workdir=workdirs/pggan_pneumonia_mnist
  python -m launch.train_anomaly --config=configs/anomaly.py:pneumonia_mnist_ddpm \
      --workdir=workdirs/anomaly_ddpm --config.generator_workdir=workdirs/ddpm_pneumonia_mnist

Writes to the workdir: config.json, (f-AnoGAN) metrics.jsonl, tensorboard/ and checkpoints/,
then results.json (val/test ROC-AUC, PR-AUC, metrics at the validation-chosen threshold, test
CIs), results.md, roc.png, residuals.png and {val,test}_scores.npz. Re-running the same command
resumes an interrupted encoder run or returns the saved results of a finished one.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from cxrjax.train import anomaly_run
from launch import common

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (:PRESET).", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it has checkpoints).")
flags.mark_flags_as_required(["config", "workdir"])
WORKDIR_OPTIONS = common.define_workdir_flags()


def main(argv):
    del argv
    common.setup()
    common.run_job(
        lambda: anomaly_run.train_and_evaluate(CONFIG.value, WORKDIR.value, **WORKDIR_OPTIONS()),
        lambda results: {
            "workdir": WORKDIR.value,
            "method": results["method"],
            "threshold": results["threshold"],
            "test": {k: results["test"].get(k) for k in ("auc", "auc_ci", "pr_auc", "f1")},
        },
        validate=lambda: common.validate_training(
            anomaly_run, CONFIG.value, WORKDIR.value, WORKDIR_OPTIONS()
        ),
    )


if __name__ == "__main__":
    common.main_entry(main)
