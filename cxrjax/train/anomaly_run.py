"""Anomaly runs: train the f-AnoGAN encoder (shared loop, exact resume), then evaluate.

method "fanogan": restores the PGGAN run in `config.generator_workdir` (EMA G + D, latest
checkpoint), trains the encoder on the normal training images only (`data.normal_class`) through
`loop.run` with Orbax checkpoints of (encoder state, Grain iterator, run signature), then scores
validation and test with `cxrjax.anomaly.evaluate`. method "ddpm": restores the DDPM run and
only evaluates, at `ddpm.t_star` or, with `ddpm.t_star_grid`, at the t* of the grid with the
best validation ROC-AUC (`anomaly.select_on_validation`; test is scored once, at that t*).
`eval.features` (e.g. cxr:<classifier workdir>) adds the reconstruction error in that
extractor's feature space to both methods (`anomaly.with_features`); `eval.primary` names the
space the top-level results report. Everything lands in the workdir; a finished workdir
returns its results.json.

Every config error (unknown method, missing or wrong generator workdir, a normal class the
dataset or the conditional generator does not have, a t* outside the DDPM's T, a bad or
missing feature extractor) is raised before any compile.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
from absl import logging

from cxrjax import anomaly, features, parallel
from cxrjax import config as config_lib
from cxrjax.data import builders, mixing, pipeline
from cxrjax.models import encoder as encoder_lib
from cxrjax.train import anomaly as anomaly_train
from cxrjax.train import job as job_lib
from cxrjax.train import optim
from cxrjax.train import results as results_lib
from cxrjax.train import workdir as workdir_lib

GENERATOR_KIND = {"fanogan": "pggan", "ddpm": "ddpm"}
TRAIN_COMMAND = {
    "pggan": "python -m launch.train_pggan --config=configs/pggan.py:pneumonia_mnist --workdir=DIR",
    "ddpm": "python -m launch.train_ddpm --config=configs/ddpm.py:pneumonia_mnist --workdir=DIR",
}


# Choices this driver owns, on top of config.RULES (types, ranges, finiteness of every field).
RULES = (
    ("method", config_lib.choice(*anomaly.METHODS)),
    ("data.name", config_lib.choice("", *builders.BUILDERS)),  # "" = the generator's dataset
    ("data.normal_class", config_lib.text(nonempty=True)),
    ("encoder.output", config_lib.choice(*encoder_lib.OUTPUTS)),
    ("ddpm.metric", config_lib.choice(*anomaly.METRICS)),
    ("ddpm.t_star_grid", config_lib.Rule(config_lib.INTS, ge=1, allow_empty=True)),
    ("eval.features", config_lib.text()),  # "" or a cxrjax.features spec (checked below)
    ("eval.primary", config_lib.choice("", *anomaly.SPACES)),
    *optim.RULES,
)


def validate(config) -> None:
    """Every field the run relies on, checked before any file, data read or compile."""
    config_lib.check_fields(config, RULES)
    # Types, ranges, choices of single fields: RULES above and config.RULES (one table).
    check = config_lib.check
    check(
        isinstance(config.generator_workdir, str) and bool(config.generator_workdir),
        "generator_workdir",
        "is required: the PGGAN run (method fanogan) or DDPM run (method ddpm) to use",
    )
    check(
        isinstance(config.data.normal_class, str) and bool(config.data.normal_class),
        "data.normal_class",
        "must name the normal class (every other class counts as abnormal)",
    )
    pipeline.check_bad_records(config)
    smallest = min((*config.ddpm.t_star_grid, config.ddpm.t_star))
    check(
        config.ddpm.steps <= smallest + 1,
        "ddpm.steps",
        f"must be <= ddpm.t_star + 1 = {smallest + 1} (the smallest t* of ddpm.t_star / "
        "ddpm.t_star_grid)",
    )
    grid = tuple(config.ddpm.t_star_grid)
    check(len(set(grid)) == len(grid), "ddpm.t_star_grid", f"has repeated values {grid}")
    if config.eval.features:
        try:
            features.parse_spec(config.eval.features)
        except config_lib.ConfigError as error:
            raise config_lib.ConfigError(f"config.eval.features: {error}") from None
    check(
        bool(config.eval.features) or config.eval.primary != "features",
        "eval.primary",
        "'features' needs config.eval.features (a cxr:<classifier workdir> spec)",
    )
    optim.validate(config.optim)


def check_generator(config):
    """The generator run's config, after checking the workdir exists and fits the method."""
    kind = GENERATOR_KIND[config.method]
    workdir = os.path.abspath(os.path.expanduser(config.generator_workdir))
    hint = f"train one first: {TRAIN_COMMAND[kind]}"
    if not os.path.isdir(workdir):
        raise config_lib.ConfigError(
            f"config.generator_workdir: {workdir} does not exist; method {config.method!r} "
            f"needs a trained {kind} run ({hint})"
        )
    if not os.path.exists(os.path.join(workdir, "config.json")):
        raise config_lib.ConfigError(
            f"config.generator_workdir: {workdir} has no config.json, so it is not a {kind} "
            f"run directory ({hint})"
        )
    run_config = anomaly.read_run_config(workdir)
    found = anomaly.run_kind(run_config)
    if found != kind:
        raise config_lib.ConfigError(
            f"config.generator_workdir: {workdir} holds a {found} run but method "
            f"{config.method!r} needs a {kind} run"
        )
    if kind == "ddpm":
        num_timesteps = int(run_config.diffusion.num_timesteps)
        for t in (config.ddpm.t_star, *config.ddpm.t_star_grid):
            config_lib.check(
                t < num_timesteps,
                "ddpm.t_star_grid" if t != config.ddpm.t_star else "ddpm.t_star",
                f"t* = {t} must be < the DDPM run's T = {num_timesteps}",
            )
    checkpoints = os.path.join(workdir, "checkpoints")
    exported = os.path.exists(os.path.join(workdir, "generator.npz"))  # launch.export_generator
    has_step = os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))
    if not exported and not has_step:
        raise config_lib.ConfigError(
            f"config.generator_workdir: {workdir} has no checkpoint yet ({hint})"
        )
    if not os.path.exists(os.path.join(workdir, "results.json")):
        logging.warning(
            "%s has no results.json: its training did not finish; using its latest checkpoint",
            workdir,
        )
    return run_config


def data_options(config, run_config) -> tuple[str, dict[str, Any]]:
    """(dataset name, builder options): the generator run's dataset unless the config says
    otherwise, prepared at the resolution the generator's records were prepared at."""
    mine, theirs = config.data, run_config.data
    same = not mine.name or mine.name == theirs.name
    name = mine.name or theirs.name
    if same and "source_resolution" in theirs:  # PGGAN: records at source_resolution
        resolution = theirs.source_resolution or None
    elif same:
        resolution = theirs.resolution
    else:
        resolution = run_config.data.resolution
    options = {
        "data_dir": mine.data_dir or theirs.get("data_dir") or None,
        "manual_dir": mine.manual_dir or (theirs.get("manual_dir") if same else None) or None,
        "resolution": resolution,
        "skip_corrupt": mine.skip_corrupt,
    }
    labels = mine.labels or (theirs.get("labels") if same else "")
    if labels:
        options["labels"] = labels
    return name, options


# Fields outside the encoder run's config hash (scoring settings do not change the training).
HASH_IGNORE = (
    "train.log_every",
    "train.checkpoint_every",
    *config_lib.THROUGHPUT_FIELDS,
    "eval",
    "ddpm",
    *pipeline.POLICY_FIELDS,
)


class AnomalyJob(job_lib.Job):
    """The anomaly family: f-AnoGAN trains an encoder (a plan with state), the DDPM method
    only scores (a plan without); both score val and test in `finish`."""

    name = "anomaly"
    hash_ignore = HASH_IGNORE

    validate = staticmethod(validate)

    def prepare(self, config, mesh) -> None:
        check_generator(config)
        if config.eval.features:
            try:  # the classifier workdir of cxr:, before any compute
                features.check_spec(config.eval.features)
            except FileNotFoundError as error:
                raise config_lib.ConfigError(f"config.eval.features: {error}") from None
        parallel.check_global_batch(int(config.eval.batch_size), mesh, "eval batch")
        if config.method == "fanogan":
            parallel.check_global_batch(int(config.train.global_batch_size), mesh)

    def build(self, config, workdir: str, mesh) -> job_lib.Plan:
        name, options = data_options(config, check_generator(config))
        builders.prepare(name, **options)
        splits, spec = {}, None
        for role in ("train", "val", "test"):
            splits[role], spec = builders.load(name, config.data[f"{role}_split"], **options)
        normal_class = config.data.normal_class
        anomaly.check_normal_class(spec, normal_class)
        kind = GENERATOR_KIND[config.method]
        run = anomaly.load_generator_run(config.generator_workdir, kind, mesh)
        generator = run.modules["generator" if run.kind == "pggan" else "model"]
        normal_label = anomaly.class_label(
            normal_class, run.spec.class_names, generator.num_classes > 0
        )
        if config.method == "fanogan":
            plan = encoder_plan(config, run, splits["train"], spec, mesh, normal_label)
        else:
            plan = job_lib.Plan(init_fn=None)
        # The extractor is restored once and shared by every scorer (each t* of a grid).
        extractor = features.make_extractor(config.eval.features) if config.eval.features else ""
        plan.extra.update(run=run, splits=splits, spec=spec, extractor=extractor)
        return plan

    def finish(self, config, plan: job_lib.Plan, ended: job_lib.Ended) -> dict[str, Any]:
        run, splits, spec = (plan.extra[k] for k in ("run", "splits", "spec"))
        mesh = ended.mesh
        normal_class = config.data.normal_class
        space = {"spec": plan.extra["extractor"], "primary": config.eval.primary, "mesh": mesh}
        extra: dict[str, Any] = {}
        selection = None
        if config.method == "fanogan":
            scorer = anomaly.FAnoGANScorer(
                run,
                plan.extra["encoder"],
                ended.state.params,
                normal_class=normal_class,
                kappa=config.fanogan.kappa,
                mesh=mesh,
                extra_info={"encoder_workdir": ended.workdir, "encoder_step": int(ended.step)},
            )
            scorer = anomaly.with_features(scorer, **space)
            extra["training"] = encoder_summary(config, plan, ended)
        else:

            def ddpm_scorer(t_star):
                scorer = anomaly.DDPMScorer(
                    run,
                    normal_class=normal_class,
                    seed=int(config.seed),
                    mesh=mesh,
                    t_star=int(t_star),
                    **{k: config.ddpm[k] for k in ("steps", "metric", "eta", "guidance")},
                )
                return anomaly.with_features(scorer, **space)

            grid = [int(t) for t in config.ddpm.t_star_grid]
            scorer = None if grid else ddpm_scorer(config.ddpm.t_star)
            if grid:  # t* from validation only; test is scored once, at the chosen t*
                selection = anomaly.select_on_validation(
                    {t: functools.partial(ddpm_scorer, t) for t in grid},
                    splits["val"],
                    spec,
                    normal_class,
                    name="t_star",
                    batch_size=int(config.eval.batch_size),
                    mesh=mesh,
                    num_workers=int(config.data.num_workers),
                )
            # The t* used for test (chosen on validation when there is a grid) and the grid.
            extra["t_star"] = int(selection.chosen if grid else config.ddpm.t_star)
            extra["t_star_grid"] = grid
        return anomaly.evaluate(
            scorer,
            {"val": splits["val"], "test": splits["test"]},
            spec,
            normal_class,
            ended.workdir,
            batch_size=int(config.eval.batch_size),
            threshold=config.eval.threshold,
            n_bootstrap=int(config.eval.bootstrap),
            level=float(config.eval.confidence),
            seed=int(config.seed),
            num_examples=int(config.eval.num_examples),
            num_workers=int(config.data.num_workers),
            mesh=mesh,
            extra={"config": config_lib.to_dict(config), **extra},
            selection=selection,
        )


JOB = AnomalyJob()


def train_and_evaluate(
    config, workdir: str, *, stop_at: int | None = None, **workdir_options
) -> dict[str, Any]:
    """Trains the encoder (f-AnoGAN) and evaluates on val/test; writes everything to workdir.

    Re-running on the same workdir resumes training exactly, or returns the saved results of a
    finished run; a workdir of another config is refused before anything is written
    (`workdir.check`; `workdir_options`: overwrite, force_resume). `stop_at` stops training
    after that step with a checkpoint. See `cxrjax.train.job`.
    """
    return job_lib.train(JOB, config, workdir, stop_at=stop_at, **workdir_options)


def encoder_plan(config, run, train_source, spec, mesh, normal_label) -> job_lib.Plan:
    """The f-AnoGAN encoder's training on the normal training images (izi_f loss)."""
    generator = run.modules["generator"]
    discriminator = run.modules["discriminator"]
    resolution = run.resolution
    encoder = anomaly_train.make_encoder(config.encoder, generator.latent_dim)
    num_steps = int(config.train.num_steps)
    batch_size = int(config.train.global_batch_size)
    tx, lr_schedule = optim.make_optimizer(config.optim, num_steps)
    init_fn = functools.partial(
        anomaly_train.init_state, encoder, tx, image_shape=(resolution, resolution, 1)
    )
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(int(config.seed)))
    step_fn = anomaly_train.make_train_step(
        encoder,
        generator,
        discriminator,
        tx,
        resolution=resolution,
        kappa=float(config.fanogan.kappa),
        normal_label=normal_label,
        lr_schedule=lr_schedule,
    )
    train_step = anomaly_train.compile_train_step(step_fn, mesh, abstract, run.params)
    normal_class = config.data.normal_class
    normals = mixing.class_indices(mixing.read_labels(train_source), normal_class, spec.class_names)
    if len(normals) < batch_size:
        raise config_lib.ConfigError(
            f"config.train.global_batch_size: {batch_size} exceeds the {len(normals)} "
            f"{normal_class!r} training images"
        )
    normal_source = mixing.Part(train_source, name=normal_class, indices=normals)
    train_iter = job_lib.train_iterator(
        config,
        normal_source,
        spec,
        resolution=resolution,
        content_resolution=run.content_resolution,
    )
    return job_lib.Plan(
        init_fn=init_fn,
        batches=train_iter,
        train_step=train_step,
        signature={
            "dataset": f"{spec.name}:{normal_class}",
            "train_records": int(len(normals)),
            "generator": f"{run.workdir}@{run.step}",
        },
        abstract=abstract,
        extra={"encoder": encoder, "normal_train_records": int(len(normals))},
    )


def encoder_summary(config, plan: job_lib.Plan, ended: job_lib.Ended) -> dict[str, Any]:
    """results.json's "training" block: steps, losses and the encoder's size."""
    losses = {str(int(r["step"])): r["train/loss"] for r in ended.history if "train/loss" in r}
    return {
        "num_steps": int(config.train.num_steps),
        "start_step": int(ended.start_step),
        "final_step": int(ended.step),
        "global_batch_size": int(config.train.global_batch_size),
        "normal_train_records": plan.extra["normal_train_records"],
        "encoder_params": int(sum(x.size for x in jax.tree.leaves(plan.abstract.params))),
        "nonfinite_steps": int(jax.device_get(ended.state.nonfinite_steps)),
        "losses": losses,
        "final_loss": losses[max(losses, key=int)] if losses else None,
        "history": ended.history,
    }


def train_encoder(
    config,
    workdir,
    run,
    train_source,
    spec,
    mesh,
    normal_label,
    *,
    stop_at=None,
    decision=None,
    clock=None,
) -> dict[str, Any]:
    """Encoder training alone (no scoring); {"finished", "state", "step", "summary", ...}.

    `decision`: the workdir check's outcome (default: checked here); `clock`: the run's."""
    decision = decision or workdir_lib.check(config, workdir)
    clock = clock or results_lib.Clock()
    plan = encoder_plan(config, run, train_source, spec, mesh, normal_label)
    with job_lib.fit(
        JOB, config, workdir, plan, mesh=mesh, decision=decision, clock=clock, stop_at=stop_at
    ) as ended:
        return {
            "finished": ended.finished,
            "preempted": ended.preempted,
            "step": int(ended.step),
            "state": ended.state,
            "encoder": plan.extra["encoder"],
            "summary": encoder_summary(config, plan, ended),
        }
