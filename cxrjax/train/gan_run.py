"""PGGAN runs: progressive training through the shared loop, exact resume, sample grids.

Each schedule phase (4x4 stable, then fade / stable per resolution) is one `loop.run` segment
with its resolution's compiled step; global step numbers run across segments, so the loop's
per-step key `fold_in(rng, step)`, checkpoints and logs are those of one long run. The
checkpoint holds the whole `GANState` (its `images_seen` fixes phase and alpha) and the Grain
iterator, so a stop anywhere, mid-fade included, resumes exactly.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cxrjax import checkpoint as checkpoint_lib
from cxrjax import config as config_lib
from cxrjax import parallel, report
from cxrjax.data import builders, mixing, pipeline
from cxrjax.metrics import writer as writer_lib
from cxrjax.train import diffaugment, gan, loop
from cxrjax.train import results as results_lib
from cxrjax.train import workdir as workdir_lib

# Fields outside the config hash that checks a resumed run is the same run. The subset fields
# enter the signature's "dataset" string when set instead, so older checkpoints still resume.
HASH_IGNORE = (
    "train.log_every",
    "data.num_workers",
    "train.checkpoint_every",
    *mixing.SUBSET_FIELDS,
    *pipeline.POLICY_FIELDS,
)


# Choices this driver owns, on top of config.RULES (types, ranges, finiteness of every field).
RULES = (
    ("data.name", config_lib.choice(*builders.BUILDERS)),
    ("model.name", config_lib.choice(*gan.MODELS)),
    ("model.dtype", config_lib.choice(*gan.DTYPES)),
    ("optim.reset_opt", config_lib.choice(*gan.RESET_CHOICES)),
)


def validate(config) -> None:
    """Every field the run relies on, checked before any data read or compile."""
    config_lib.check_fields(config, RULES)
    check = config_lib.check
    config_lib.check_choice(config, "data.name", tuple(builders.BUILDERS))
    config_lib.check_choice(config, "model.name", tuple(gan.MODELS))
    if "dtype" in config.model:
        config_lib.check_choice(config, "model.dtype", tuple(gan.DTYPES))
    config_lib.check_choice(config, "optim.reset_opt", gan.RESET_CHOICES)
    config_lib.check_choice(config, "train.nonfinite", ("skip", "abort"))
    pipeline.check_bad_records(config)
    resolution = config.data.resolution
    check(
        isinstance(resolution, int)
        and 8 <= resolution <= 1024
        and resolution & (resolution - 1) == 0,
        "data.resolution",
        f"must be a power of two in [8, 1024] (the final PGGAN resolution), got {resolution!r}",
    )
    for field in (
        "train.global_batch_size",
        "train.log_every",
        "schedule.fade_images",
        "schedule.stable_images",
        "optim.lr",
        "samples.per_class",
    ):
        config_lib.check_positive(config, field)
    for field in ("train.checkpoint_every", "data.num_workers", "data.source_resolution"):
        config_lib.check_positive(config, field, allow_zero=True)
    group = config.model.mbstd_group_size
    try:
        sizes = batch_sizes(config)
    except ValueError as e:
        raise config_lib.ConfigError(f"config.train.batch_sizes: {e}") from None
    field = "train.batch_sizes" if config.train.get("batch_sizes") else "train.global_batch_size"
    for resolution, batch in sizes.items():
        check(batch > 0, field, f"batch {batch} at {resolution} px must be positive")
        check(
            group <= 1 or batch % group == 0,
            field,
            f"batch {batch} at {resolution} px is not divisible by the minibatch-stddev group "
            f"model.mbstd_group_size={group}",
        )
    if len(set(sizes.values())) > 1:
        # Phase boundaries on batch boundaries: each phase's first step then sees its start
        # exactly, which is where alpha and the optimizer resets are measured from.
        for name in ("schedule.fade_images", "schedule.stable_images"):
            length = config.schedule[name.split(".")[1]]
            bad = sorted({b for b in sizes.values() if length % b})
            check(
                not bad,
                name,
                f"{length} must be a multiple of every batch size when train.batch_sizes varies "
                f"the batch (not of {bad})",
            )
    check(0.0 <= config.optim.ema_decay < 1.0, "optim.ema_decay", "must be in [0, 1)")
    check(0.0 <= config.optim.b1 < 1.0, "optim.b1", "must be in [0, 1)")
    check(0.0 <= config.optim.b2 < 1.0, "optim.b2", "must be in [0, 1)")
    check(config.loss.gp_weight >= 0, "loss.gp_weight", "must be >= 0")
    try:
        diffaugment.parse(config.loss.get("diffaugment", ""))
    except ValueError as error:
        check(False, "loss.diffaugment", str(error))
    mixing.check_subset_options(config.data)


def _phases(config) -> list[gan.Phase]:
    return gan.phases(
        config.data.resolution,
        config.schedule.fade_images,
        config.schedule.stable_images,
        int(config.schedule.get("final_stable_images", 0)),
    )


def phase_end_step(phase: gan.Phase, global_batch_size: int) -> int:
    """The global step after which the phase is over (its first step s has s*B >= start)."""
    return math.ceil(phase.end / global_batch_size)


def step_factory(config, generator, discriminator, txs):
    """`resolution -> train_step` with the config's schedule, loss weights, EMA and resets."""
    return functools.partial(
        gan.make_train_step,
        generator,
        discriminator,
        txs,
        fade_images=int(config.schedule.fade_images),
        stable_images=int(config.schedule.stable_images),
        gp_weight=config.loss.gp_weight,
        drift_weight=config.loss.drift_weight,
        cls_weight=config.loss.cls_weight,
        fake_cls_weight=0.0 if config.loss.get("cls_reals_only", False) else None,
        diffaugment=config.loss.get("diffaugment", ""),
        conditioning=config.loss.get("conditioning", ""),
        ema_decay=config.optim.ema_decay,
        reset_opt=config.optim.reset_opt,
    )


def batch_sizes(config) -> dict[int, int]:
    """Global batch per resolution: `train.batch_sizes` ("4:64,128:16") or the one batch."""
    return gan.parse_batch_sizes(
        config.train.get("batch_sizes", ""),
        int(config.train.global_batch_size),
        int(config.data.resolution),
    )


class GroupedBatches(grain.DatasetIterator):
    """Concatenates `factor` consecutive batches of the base iterator (set per phase).

    The pipeline yields one fixed base batch (the gcd of the per-resolution batches); a phase
    with a batch of k x base takes k of them per step. The state is the base iterator's, saved
    after whole steps, so a resumed run still continues on exactly the next batch. With k > 1 and
    several processes the rows of a global batch come in process-major order (the same examples,
    in another order than one process would give).
    """

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.factor = 1

    def __next__(self):
        parts = [next(self._parent) for _ in range(self.factor)]
        if self.factor == 1:
            return parts[0]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def train_and_evaluate(
    config, workdir: str, *, stop_at: int | None = None, **workdir_options
) -> dict[str, Any]:
    """Trains PGGAN through every phase; writes samples/, checkpoints/, results.json.

    Re-running on the same workdir resumes (mid-phase included) and returns the saved results
    of a finished run; a workdir of another config is refused before anything is written
    (`workdir.check`; `workdir_options`: overwrite, force_resume). `stop_at` stops after that
    global step with a checkpoint.
    """
    clock = results_lib.Clock()
    validate(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    results_path = os.path.join(workdir, "results.json")
    decision = workdir_lib.prepare(config, workdir, **workdir_options)
    if decision.finished:
        return decision.results
    mesh = parallel.make_mesh()
    sizes = batch_sizes(config)
    base_batch = math.gcd(*sizes.values())
    for batch in sorted(set(sizes.values())) + [base_batch]:
        parallel.check_global_batch(batch, mesh)

    data = config.data
    options = {
        "data_dir": data.data_dir or None,
        "manual_dir": data.manual_dir or None,
        "resolution": data.source_resolution or None,
        "skip_corrupt": data.skip_corrupt,
    }
    if data.labels:
        options["labels"] = data.labels
    builders.prepare(data.name, **options)
    train_source, spec = builders.load(data.name, data.train_split, **options)
    # The scarce and/or one-class subset when data.keep_class / data.only_class are set.
    train_source = mixing.training_subset(train_source, spec, data)
    max_resolution = int(data.resolution)
    generator, discriminator = gan.make_models(config.model, spec.num_classes, max_resolution)
    g_tx = d_tx = gan.make_optimizer(config.optim)
    rng = jax.random.PRNGKey(config.seed)
    init_fn = functools.partial(init_state_fn, generator, discriminator, g_tx, d_tx)
    abstract = jax.eval_shape(init_fn, rng)
    replicated = parallel.replicated(mesh)
    steps = gan.CompiledSteps(
        step_factory(config, generator, discriminator, (g_tx, d_tx)),
        mesh,
        abstract,
    )
    base_iter = pipeline.make_train_iterator(
        train_source,
        spec,
        global_batch_size=base_batch,
        seed=config.seed,
        resolution=max_resolution,
        augment=data.augment,
        normalization="generator",
        num_workers=data.num_workers,
        balanced=bool(data.get("balanced", False)),
        **pipeline.bad_record_options(config.data),
    )
    train_iter = GroupedBatches(base_iter)
    signature = {
        "config_hash": config_lib.config_hash(decision.hash_config(config), ignore=HASH_IGNORE),
        "global_batch_size": base_batch,
        "batch_sizes": {str(r): b for r, b in sizes.items()},
        "dataset": f"{data.name}:{data.source_resolution}:{data.labels}"
        + mixing.subset_signature(data),
        "train_records": len(train_source),
    }
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints
    )
    with checkpoint_lib.closing_on_error(checkpointer):
        state, step = checkpoint_lib.restore_or_init(
            checkpointer,
            checkpoint_lib.abstract_like(abstract, replicated),
            lambda: jax.jit(init_fn, out_shardings=replicated)(rng),
            train_iter,
            signature,
            ignore=decision.signature_ignore,
        )
        clock.resume(checkpointer.restored_meta)
        decision.record(config)  # the run is accepted: now its config.json is (re)written
    writer = writer_lib.MetricWriter(workdir, enabled=parallel.is_main_process(), resume_step=step)
    sampler = Sampler(generator, config, spec, workdir)
    base_rng = parallel.replicate(np.asarray(jax.device_get(state.rng)), mesh)
    history: list[dict[str, float]] = []
    all_phases = _phases(config)
    ends = gan.phase_end_steps(all_phases, sizes)
    try:
        for phase, end in zip(all_phases, ends, strict=True):
            if step >= end:
                continue
            train_iter.factor = sizes[phase.resolution] // base_batch
            logging.info(
                "phase %d: %s at %dx%d, steps %d..%d",
                phase.index,
                phase.kind,
                phase.resolution,
                phase.resolution,
                step + 1,
                end,
            )
            outcome = loop.run(
                state=state,
                train_step=steps(phase.resolution),
                batches=train_iter,
                mesh=mesh,
                rng=base_rng,
                start_step=step,
                num_steps=end,
                images_per_step=sizes[phase.resolution],
                checkpointer=checkpointer,
                writer=writer,
                log_every=config.train.log_every,
                checkpoint_every=config.train.checkpoint_every,
                metadata={"signature": signature, "phase": phase.index},
                nonfinite=config.train.nonfinite,
                max_bad_fraction=pipeline.max_bad_fraction(config.data),
                label="train",
                stop_at=stop_at,
                clock=clock,
            )
            state, step = outcome.state, outcome.step
            history.extend(outcome.history)
            if outcome.preempted or step < end:
                return {"finished": False, "step": step, "preempted": outcome.preempted}
            sampler.save(state, phase, config.schedule)
        results = {
            "finished": True,
            "step": int(step),
            "images_seen": int(jax.device_get(state.images_seen)),
            "nonfinite_steps": int(jax.device_get(state.nonfinite_steps)),
            "phases": [
                {**vars(p), "batch": sizes[p.resolution], "end_step": e}
                for p, e in zip(all_phases, ends, strict=True)
            ],
            "compiled_resolutions": sorted(steps.cache),
            "samples": sorted(os.listdir(sampler.directory))
            if os.path.isdir(sampler.directory)
            else [],
            "class_names": list(spec.class_names),
            "train_records": len(train_source),
            # Every session's rows, one per step (metrics.jsonl), not only this session's.
            "history": writer_lib.read_history(workdir) or history,
            "config": config_lib.to_dict(config),
            "software": results_lib.software_versions(),
            "device": results_lib.device_description(),
            "wall_time_s": clock.total(),
        }
        if parallel.is_main_process():
            results_lib.save_results(results_path, results)
        return results
    finally:
        writer.close()
        checkpointer.close()


def init_state_fn(generator, discriminator, g_tx, d_tx, rng):
    return gan.init_state(generator, discriminator, g_tx, d_tx, rng)


class Sampler:
    """Per-phase PNG grids from EMA G: one row per class, fixed latents (seed-derived)."""

    def __init__(self, generator, config, spec, workdir: str):
        self.generator = generator
        self.directory = os.path.join(workdir, "samples")
        self.max_resolution = int(config.data.resolution)
        per_class = int(config.samples.per_class)
        num_classes = generator.num_classes or 1
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x5A)
        self.latents = jax.random.normal(
            key, (num_classes * per_class, generator.latent_dim), jnp.float32
        )
        self.labels = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), per_class)
        self.per_class = per_class
        self.class_names = spec.class_names if generator.num_classes else None
        self._sample = gan.make_sample_fn(generator)

    def save(self, state, phase: gan.Phase, schedule) -> str | None:
        name = f"phase{phase.index:02d}_{phase.resolution}x{phase.resolution}_{phase.kind}.png"
        path = os.path.join(self.directory, name)
        _, alpha = gan.schedule(
            phase.end - 1, self.max_resolution, schedule.fade_images, schedule.stable_images
        )
        alpha = 1.0 if phase.kind == gan.STABLE else alpha
        images = self._sample(
            state.g_ema_params, self.latents, self.labels, alpha, resolution=phase.resolution
        )
        images = np.asarray(jax.device_get(images), np.float32)
        factor = self.max_resolution // phase.resolution
        images = images.repeat(factor, axis=1).repeat(factor, axis=2)  # nearest, for comparison
        if not parallel.is_main_process():
            return None
        os.makedirs(self.directory, exist_ok=True)
        report.save_image_grid(
            np.clip(images, -1.0, 1.0), path, nrow=self.per_class, value_range=(-1.0, 1.0)
        )
        return path
