r"""Evaluates a saved classifier checkpoint on any split of its dataset.

  python -m launch.evaluate_classifier --workdir=/tmp/cls --split=test [--step=N] [--output=DIR]

The threshold is chosen on the validation split for that checkpoint, then applied to --split.
Writes results.json (metrics with bootstrap CIs), results.md and roc.png to --output
(default: WORKDIR/eval_<split>_step<N>).
"""

from __future__ import annotations

from absl import flags

from cxrjax.train import classifier_run
from launch import common

WORKDIR = flags.DEFINE_string("workdir", None, "A train_classifier workdir.", required=True)
SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate (train, val, test).")
STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: best by val AUC, else last).")
OUTPUT = flags.DEFINE_string("output", None, "Output directory.")


def main(argv):
    del argv
    common.setup()
    common.run_job(
        lambda: classifier_run.evaluate_checkpoint(
            WORKDIR.value, SPLIT.value, step=STEP.value, output_dir=OUTPUT.value
        ),
        lambda results: {
            "step": results["step"],
            "split": SPLIT.value,
            **{k: results[SPLIT.value].get(k) for k in ("auc", "accuracy", "f1")},
        },
        # The run's recorded config must exist and be valid before --output is created.
        validate=lambda: classifier_run.validate(classifier_run.load_run_config(WORKDIR.value)),
    )


if __name__ == "__main__":
    common.main_entry(main)
