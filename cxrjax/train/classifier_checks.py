"""Classifier config checks: every field a classifier run relies on, before any data or compile.

Lives below the driver (`classifier_run`) so that readers of finished runs (features, explain)
validate a workdir's config without importing the trainer.
"""

from __future__ import annotations

import os

from cxrjax import config as config_lib
from cxrjax.data import builders, mixing, pipeline
from cxrjax.models import densenet
from cxrjax.train import classifier as classifier_lib
from cxrjax.train import optim
from cxrjax.train.classifier import DTYPES

# Choices this driver owns, on top of config.RULES (types, ranges, finiteness of every field).
RULES = (
    ("data.name", config_lib.choice(*builders.BUILDERS)),
    ("model.name", config_lib.choice(*densenet.MODELS)),
    ("model.stem", config_lib.choice(*densenet.STEMS)),
    ("model.dtype", config_lib.choice(*DTYPES)),
    *optim.RULES,
)


def validate(config) -> None:
    """Every field the run relies on, checked before any data read or compile."""
    config_lib.check_fields(config, RULES)
    # Types, ranges, choices of single fields: RULES above and config.RULES (one table).
    check = config_lib.check
    config_lib.check_choice(config, "loss.class_weighting", classifier_lib.WEIGHTINGS)
    pipeline.check_bad_records(config)
    for role in ("train", "val"):
        # By construction, the test split never trains a model nor picks a checkpoint or a
        # threshold: those read only data.train_split and data.val_split.
        check(
            config.data[f"{role}_split"] != config.data.test_split,
            f"data.{role}_split",
            f"must differ from data.test_split ({config.data.test_split!r})",
        )
    mixing.check_subset_options(config.data)
    synthetic = config.data.get("synthetic")
    if synthetic is not None and synthetic.manual_dir:
        check(
            os.path.isdir(os.path.expanduser(synthetic.manual_dir)),
            "data.synthetic.manual_dir",
            f"{synthetic.manual_dir!r} is not a directory",
        )
        check(synthetic.count >= 0, "data.synthetic.count", "must be >= 0")
        check(0.0 <= synthetic.fraction < 1.0, "data.synthetic.fraction", "must be in [0, 1)")
        check(
            not (synthetic.count and synthetic.fraction),
            "data.synthetic.count",
            "give data.synthetic.count or data.synthetic.fraction, not both",
        )
    check(
        config.train.select == "last" or config.train.eval_every > 0,
        "train.select",
        "'best' needs train.eval_every > 0 (validation AUC picks the checkpoint)",
    )
    if config.model.pretrained:
        check(
            os.path.exists(os.path.expanduser(config.model.pretrained)),
            "model.pretrained",
            f"weights file {config.model.pretrained!r} does not exist",
        )
    optim.validate(config.optim)
    classifier_lib.check_recipe(config)
