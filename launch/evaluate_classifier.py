r"""Evaluates a saved classifier checkpoint on any split of its dataset.

  python -m launch.evaluate_classifier --workdir=/tmp/cls --split=test [--step=N] [--output=DIR]

The threshold is chosen on the validation split for that checkpoint, then applied to --split.
Writes results.json (metrics with bootstrap CIs), results.md and roc.png to --output
(default: WORKDIR/eval_<split>_step<N>).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from cxrjax import checkpoint as checkpoint_lib
from cxrjax import config as config_lib
from cxrjax.data import builders
from cxrjax.train import classifier_run
from launch import common

WORKDIR = flags.DEFINE_string("workdir", None, "A train_classifier workdir.", required=True)
SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate (train, val, test).")
STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: best by val AUC, else last).")
OUTPUT = flags.DEFINE_string("output", None, "Output directory.")


def main(argv):
    del argv
    common.setup()
    try:
        results = classifier_run.evaluate_checkpoint(
            WORKDIR.value, SPLIT.value, step=STEP.value, output_dir=OUTPUT.value
        )
    except (
        config_lib.ConfigError,
        builders.DatasetError,
        checkpoint_lib.CheckpointError,
        FileNotFoundError,
    ) as error:
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    split = results[SPLIT.value]
    headline = {k: split.get(k) for k in ("auc", "accuracy", "f1") if k in split}
    print(json.dumps({"step": results["step"], "split": SPLIT.value, **headline}))


if __name__ == "__main__":
    app.run(main)
