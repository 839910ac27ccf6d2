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
    check = config_lib.check
    config_lib.check_choice(config, "data.name", tuple(builders.BUILDERS))
    config_lib.check_choice(config, "model.name", tuple(densenet.MODELS))
    config_lib.check_choice(config, "model.stem", densenet.STEMS)
    config_lib.check_choice(config, "model.dtype", tuple(DTYPES))
    config_lib.check_choice(config, "loss.class_weighting", classifier_lib.WEIGHTINGS)
    config_lib.check_choice(config, "train.select", ("best", "last"))
    config_lib.check_choice(config, "train.nonfinite", ("skip", "abort"))
    pipeline.check_bad_records(config)
    config_lib.check_choice(config, "eval.threshold", ("youden", "f1"))
    for field in (
        "data.resolution",
        "train.global_batch_size",
        "train.num_steps",
        "train.log_every",
        "eval.batch_size",
        "data.std",
    ):
        config_lib.check_positive(config, field)
    for field in (
        "train.eval_every",
        "train.checkpoint_every",
        "data.num_workers",
        "eval.bootstrap",
    ):
        config_lib.check_positive(config, field, allow_zero=True)
    check(0.0 <= config.loss.label_smoothing < 1.0, "loss.label_smoothing", "must be in [0, 1)")
    check(0.0 <= config.optim.ema_decay < 1.0, "optim.ema_decay", "must be in [0, 1)")
    check(0.0 < config.eval.confidence < 1.0, "eval.confidence", "must be in (0, 1)")
    check(len(config.model.block_config) >= 1, "model.block_config", "needs at least one block")
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
