"""DDPM runs: train with resume, periodic class-conditional sample grids, results.json.

The state, step and sampler live in `cxrjax.train.diffusion` (no data stack needed); this
module wires them to the data pipeline ([-1, 1] images), the shared loop, Orbax checkpoints
(state + Grain iterator + run signature) and the sample PNGs.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from cxrjax import config as config_lib
from cxrjax import parallel, report
from cxrjax.data import builders, mixing, pipeline, sources
from cxrjax.train import job as job_lib
from cxrjax.train import optim, runs
from cxrjax.train import results as results_lib
from cxrjax.train.diffusion import (
    DTYPES,
    MODELS,
    NOISE_SCHEDULES,
    PREDICTIONS,
    compile_steps,
    init_state,
    make_model,
    make_noise_schedule,
)

# Fields outside the config hash that checks a resumed run is the same run. The subset fields
# enter the signature's "dataset" string when set instead, so older checkpoints still resume.
HASH_IGNORE = (
    "train.log_every",
    *config_lib.THROUGHPUT_FIELDS,
    "train.sample_every",
    "sample",
    *mixing.SUBSET_FIELDS,
    *pipeline.POLICY_FIELDS,
)


# Choices this driver owns, on top of config.RULES (types, ranges, finiteness of every field).
RULES = (
    ("data.name", config_lib.choice(*builders.BUILDERS)),
    ("model.name", config_lib.choice(*MODELS)),
    ("model.dtype", config_lib.choice(*DTYPES)),
    ("diffusion.schedule", config_lib.choice(*NOISE_SCHEDULES)),
    ("diffusion.prediction", config_lib.choice(*PREDICTIONS)),
    *optim.RULES,
)


def validate(config) -> None:
    """Every field the run relies on, checked before any data read or compile."""
    config_lib.check_fields(config, RULES)
    # Types, ranges, choices of single fields: RULES above and config.RULES (one table).
    check = config_lib.check
    pipeline.check_bad_records(config)
    check(
        0.0 < config.diffusion.beta_start < config.diffusion.beta_end < 1.0,
        "diffusion.beta_start",
        "needs 0 < beta_start < beta_end < 1",
    )
    check(
        0.0 <= config.diffusion.label_dropout < 1.0,
        "diffusion.label_dropout",
        "must be in [0, 1)",
    )
    mixing.check_subset_options(config.data)
    check(
        config.sample.steps <= config.diffusion.num_timesteps,
        "sample.steps",
        f"must be <= diffusion.num_timesteps ({config.diffusion.num_timesteps})",
    )
    levels = len(MODELS[config.model.name].keywords["ch_mult"]) - 1
    check(
        config.data.resolution % 2**levels == 0,
        "data.resolution",
        f"{config.model.name} needs a multiple of {2**levels}, got {config.data.resolution}",
    )
    check(
        config.model.conditional or config.sample.guidance_scale == 0,
        "sample.guidance_scale",
        "guidance needs model.conditional = True",
    )
    optim.validate(config.optim)


def load_train_split(data):
    """Prepares (idempotently) and opens the training split of the configured dataset.

    With `data.only_class` and/or `data.keep_class` / `keep_fraction` set, the source holds
    only that subset of the records (a mixing.Part; see `mixing.training_subset`).
    """
    options = runs.dataset_options(data)
    builders.prepare(data.name, **options)
    source, spec = builders.load(data.name, data.train_split, **options)
    return mixing.training_subset(source, spec, data), spec


def sample_labels(num_classes: int, per_class: int) -> np.ndarray:
    """Grid labels: `per_class` of class 0, then of class 1, ... (one grid row per class)."""
    return np.repeat(np.arange(max(num_classes, 1), dtype=np.int32), per_class)


def sample_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, "samples", f"step_{step:06d}.png")


class DiffusionJob(job_lib.Job):
    """The DDPM family: EMA sample grids on the way (train.sample_every), losses at the end."""

    name = "ddpm"
    hash_ignore = HASH_IGNORE

    validate = staticmethod(validate)

    def build(self, config, workdir: str, mesh) -> job_lib.Plan:
        train_source, spec = load_train_split(config.data)
        if config.model.conditional and spec.label_kind != sources.MULTICLASS:
            raise config_lib.ConfigError(
                f"config.model.conditional: {spec.name} is {spec.label_kind}; class "
                "conditioning needs single-label classes (set model.conditional=False)"
            )
        model = make_model(config.model, spec.num_classes)
        noise_schedule = make_noise_schedule(config.diffusion)
        num_steps = int(config.train.num_steps)
        tx, lr_schedule = optim.make_optimizer(config.optim, num_steps)
        resolution = int(config.data.resolution)
        image_shape = (resolution, resolution, 1)
        init_fn = functools.partial(init_state, model, tx, image_shape=image_shape)
        abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed))
        train_step, sample = compile_steps(
            model,
            tx,
            noise_schedule,
            mesh,
            abstract,
            lr_schedule=lr_schedule,
            prediction=config.diffusion.prediction,
            label_dropout=float(config.diffusion.label_dropout),
            ema_decay=float(config.optim.ema_decay),
            image_shape=image_shape,
            sample_steps=int(config.sample.steps),
            guidance_scale=float(config.sample.guidance_scale),
            sample_eta=float(config.sample.get("eta", 0.0)),
        )
        train_iter = job_lib.train_iterator(config, train_source, spec, resolution=resolution)

        # Fixed noise and labels for every grid: one row per class, the same x_T every time.
        num_grid_classes = spec.num_classes if config.model.conditional else 1
        grid_labels = sample_labels(num_grid_classes, int(config.sample.per_class))
        grid_rng = parallel.replicate(np.asarray(jax.random.PRNGKey(config.sample.seed)), mesh)
        grid_labels_device = parallel.replicate(grid_labels, mesh)
        conditional = config.model.conditional
        captions = [spec.class_names[i] for i in grid_labels] if conditional else None

        def sample_fn(state, step):
            images = sample(state.ema_params, grid_rng, grid_labels_device)
            images = np.asarray(jax.device_get(images))
            if parallel.is_main_process():
                path = sample_path(workdir, step)
                report.save_image_grid(
                    images, path, nrow=int(config.sample.per_class), value_range=(-1.0, 1.0)
                )
                logging.info("[samples] step %d -> %s (rows: %s)", step, path, captions)
            return {"samples/mean": float(images.mean()), "samples/std": float(images.std())}

        return job_lib.Plan(
            init_fn=init_fn,
            batches=train_iter,
            train_step=train_step,
            signature={
                "dataset": f"{config.data.name}:{config.data.resolution}:{config.data.labels}"
                + mixing.subset_signature(config.data),
                "train_records": len(train_source),
            },
            abstract=abstract,
            eval_fn=sample_fn,
            eval_every=int(config.train.sample_every),
            extra={"spec": spec, "train_records": len(train_source), "sample_fn": sample_fn},
        )

    def finish(self, config, plan: job_lib.Plan, ended: job_lib.Ended) -> dict[str, Any]:
        spec, workdir, state = plan.extra["spec"], ended.workdir, ended.state
        if not config.train.sample_every:
            plan.extra["sample_fn"](state, ended.step)
        losses = _losses(ended.history)
        return {
            "dataset": {
                "name": config.data.name,
                "resolution": int(config.data.resolution),
                "class_names": list(spec.class_names),
                "train_records": plan.extra["train_records"],
            },
            "seed": int(config.seed),
            "num_steps": int(config.train.num_steps),
            "start_step": int(ended.start_step),
            "final_step": int(ended.step),
            "num_params": int(sum(x.size for x in jax.tree.leaves(plan.abstract.params))),
            "nonfinite_steps": int(jax.device_get(state.nonfinite_steps)),
            "losses": losses,
            "final_loss": losses[max(losses, key=int)] if losses else None,
            "samples": sorted(
                os.path.relpath(p, workdir) for p in _grids(os.path.join(workdir, "samples"))
            ),
            "history": ended.history,  # every session's rows, one per step
            "config": config_lib.to_dict(config),
            "software": results_lib.software_versions(),
            "device": results_lib.device_description(),
        }


JOB = DiffusionJob()


def train_and_evaluate(
    config, workdir: str, *, stop_at: int | None = None, **workdir_options
) -> dict[str, Any]:
    """Trains the DDPM, saving EMA sample grids on the way; writes results.json at the end.

    Re-running on the same workdir resumes an interrupted run and returns the saved results of
    a finished one; a workdir of another config is refused before anything is written
    (`workdir.check`; `workdir_options`: overwrite, force_resume). See `cxrjax.train.job`.
    """
    return job_lib.train(JOB, config, workdir, stop_at=stop_at, **workdir_options)


def _losses(history: list[dict[str, Any]]) -> dict[str, float | None]:
    """Logged training losses by step over the whole run (all sessions; None = non-finite)."""
    return {
        str(int(r["step"])): None if r["train/loss"] is None else float(r["train/loss"])
        for r in history
        if "train/loss" in r
    }


def _grids(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return [os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".png")]
