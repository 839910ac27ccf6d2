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

from cxrjax import config as config_lib
from cxrjax import parallel, report
from cxrjax.data import builders, mixing, pipeline
from cxrjax.train import diffaugment, gan, runs
from cxrjax.train import job as job_lib
from cxrjax.train import results as results_lib

# Fields outside the config hash that checks a resumed run is the same run. The subset fields
# enter the signature's "dataset" string when set instead, so older checkpoints still resume.
HASH_IGNORE = (
    "train.log_every",
    *config_lib.THROUGHPUT_FIELDS,
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
    # Types, ranges, choices of single fields: RULES above and config.RULES (one table).
    check = config_lib.check
    pipeline.check_bad_records(config)
    resolution = config.data.resolution
    check(
        isinstance(resolution, int)
        and 8 <= resolution <= 1024
        and resolution & (resolution - 1) == 0,
        "data.resolution",
        f"must be a power of two in [8, 1024] (the final PGGAN resolution), got {resolution!r}",
    )
    content = config.data.get("content_resolution", 0)
    check(
        content == 0 or 4 <= content <= resolution,
        "data.content_resolution",
        f"must be 0 (films resized to the canvas) or in [4, data.resolution={resolution}] (films "
        f"padded onto it), got {content!r}",
    )
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
    try:
        diffaugment.parse(config.loss.get("diffaugment", ""))
    except ValueError as error:
        check(False, "loss.diffaugment", str(error))
    mixing.check_subset_options(config.data)


def config_phases(config) -> list[gan.Phase]:
    """The run's phases (resolution, fade / stable, images) from its schedule."""
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


class GanJob(job_lib.Job):
    """The PGGAN family: one segment per schedule phase (its resolution's compiled step)."""

    name = "pggan"
    hash_ignore = HASH_IGNORE

    validate = staticmethod(validate)

    def prepare(self, config, mesh) -> None:
        sizes = batch_sizes(config)
        for batch in sorted(set(sizes.values())) + [math.gcd(*sizes.values())]:
            parallel.check_global_batch(batch, mesh)

    def build(self, config, workdir: str, mesh) -> job_lib.Plan:
        sizes = batch_sizes(config)
        base_batch = math.gcd(*sizes.values())
        data = config.data
        options = runs.dataset_options(data, data.source_resolution)
        builders.prepare(data.name, **options)
        train_source, spec = builders.load(data.name, data.train_split, **options)
        # The scarce and/or one-class subset when data.keep_class / data.only_class are set.
        train_source = mixing.training_subset(train_source, spec, data)
        max_resolution = int(data.resolution)
        generator, discriminator = gan.make_models(config.model, spec.num_classes, max_resolution)
        g_tx = d_tx = gan.make_optimizer(config.optim)
        init_fn = functools.partial(init_state_fn, generator, discriminator, g_tx, d_tx)
        abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed))
        steps = gan.CompiledSteps(
            step_factory(config, generator, discriminator, (g_tx, d_tx)),
            mesh,
            abstract,
        )
        train_iter = GroupedBatches(
            job_lib.train_iterator(
                config,
                train_source,
                spec,
                resolution=max_resolution,
                content_resolution=int(data.get("content_resolution", 0)),
                global_batch_size=base_batch,
            )
        )
        sampler = Sampler(generator, config, spec, workdir)
        all_phases = config_phases(config)
        ends = gan.phase_end_steps(all_phases, sizes)
        segments = []
        for phase, end in zip(all_phases, ends, strict=True):

            def before(step, phase=phase, end=end):
                train_iter.factor = sizes[phase.resolution] // base_batch
                logging.info(
                    "phase %d: %s at %dx%d, steps %d..%d",
                    phase.index, phase.kind, phase.resolution, phase.resolution, step + 1, end,
                )  # fmt: skip

            segments.append(
                job_lib.Segment(
                    end,
                    _PhaseStep(steps, phase.resolution),  # compiled when its phase first runs
                    sizes[phase.resolution],
                    metadata={"phase": phase.index},
                    before=before,
                    after=functools.partial(sampler.save, phase=phase, schedule=config.schedule),
                )
            )
        return job_lib.Plan(
            init_fn=init_fn,
            batches=train_iter,
            segments=segments,
            signature={
                "global_batch_size": base_batch,
                "batch_sizes": {str(r): b for r, b in sizes.items()},
                "dataset": f"{data.name}:{data.source_resolution}:{data.labels}"
                + mixing.subset_signature(data),
                "train_records": len(train_source),
            },
            abstract=abstract,
            extra=dict(
                sizes=sizes, phases=all_phases, ends=ends, steps=steps, sampler=sampler,
                spec=spec, train_records=len(train_source),
            ),
        )  # fmt: skip

    def finish(self, config, plan: job_lib.Plan, ended: job_lib.Ended) -> dict[str, Any]:
        extra, state = plan.extra, ended.state
        sizes, directory = extra["sizes"], extra["sampler"].directory
        return {
            "finished": True,
            "step": int(ended.step),
            "images_seen": int(jax.device_get(state.images_seen)),
            "nonfinite_steps": int(jax.device_get(state.nonfinite_steps)),
            "phases": [
                {**vars(p), "batch": sizes[p.resolution], "end_step": e}
                for p, e in zip(extra["phases"], extra["ends"], strict=True)
            ],
            "compiled_resolutions": sorted(extra["steps"].cache),
            "samples": sorted(os.listdir(directory)) if os.path.isdir(directory) else [],
            "class_names": list(extra["spec"].class_names),
            "train_records": extra["train_records"],
            # Every session's rows, one per step (metrics.jsonl), not only this session's.
            "history": ended.history,
            "config": config_lib.to_dict(config),
            "software": results_lib.software_versions(),
            "device": results_lib.device_description(),
        }


class _PhaseStep:
    """The compiled step of one resolution, looked up (and compiled) on first call."""

    def __init__(self, steps: gan.CompiledSteps, resolution: int):
        self.steps, self.resolution = steps, resolution

    def __call__(self, state, batch, rng):
        return self.steps(self.resolution)(state, batch, rng)


JOB = GanJob()


def train_and_evaluate(
    config, workdir: str, *, stop_at: int | None = None, **workdir_options
) -> dict[str, Any]:
    """Trains PGGAN through every phase; writes samples/, checkpoints/, results.json.

    Re-running on the same workdir resumes (mid-phase included) and returns the saved results
    of a finished run; a workdir of another config is refused before anything is written
    (`workdir.check`; `workdir_options`: overwrite, force_resume). `stop_at` stops after that
    global step with a checkpoint. See `cxrjax.train.job`.
    """
    return job_lib.train(JOB, config, workdir, stop_at=stop_at, **workdir_options)


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
