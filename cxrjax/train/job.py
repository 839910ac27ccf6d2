"""How a run works: a model family is a `Job`; `train(job, config, workdir)` owns the run.

A job says only what differs between families:

* `validate(config)`: every field, before anything is written (raise `config.ConfigError`);
* `prepare(config, mesh)`: checks once the workdir is accepted: batch sizes against the
  devices (default: the train batch), inputs the run needs;
* `build(config, workdir, mesh) -> Plan`: data iterator, `init_fn`, the compiled
  `train_step` (or `Segment`s: PGGAN's growth phases), an optional periodic `eval_fn`, and
  the signature entries that tell a resumed run it is the same run;
* `finish(config, plan, ended) -> dict`: evaluate the trained state and summarise the run
  (the dict becomes results.json).

`train` does the rest, identically for every family: the workdir check (`workdir.prepare`:
a finished run returns its results, another config's workdir is refused), the mesh, the
Orbax `Checkpointer` and `restore_or_init` of (state, input iterator), `config.json` once the
run is accepted, the metric writer, `loop.run` (steps, progress and ETA, non-finite guard,
preemption, periodic and final saves) and `results.json`, written atomically by process 0.

A new family is one module with a `Job` subclass and one config file; it is then trained,
resumed, preempted and opened (`cxrjax.train.runs.load`) like every other
(tests/train/test_job.py trains a toy linear-classifier family this way).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from cxrjax import checkpoint as checkpoint_lib
from cxrjax import config as config_lib
from cxrjax import parallel, timing
from cxrjax.data import pipeline
from cxrjax.metrics import writer as writer_lib
from cxrjax.train import loop
from cxrjax.train import results as results_lib
from cxrjax.train import workdir as workdir_lib

# results.json "profile": this session's exclusive seconds in setup (data preparation, models),
# trace and compile (JAX), checkpoint (restore and saves), data (waiting for input), eval,
# finish (final evaluation and results) and, what is left, the training steps themselves.
STEPS = "steps"


@dataclasses.dataclass
class Segment:
    """Steps up to `end` with one compiled `train_step` (PGGAN: one per growth phase)."""

    end: int
    train_step: Callable[[Any, Any, jax.Array], tuple[Any, Mapping[str, jax.Array]]]
    images_per_step: int
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    before: Callable[[int], None] | None = None  # called with the start step
    after: Callable[[Any], None] | None = None  # called with the state at `end`


@dataclasses.dataclass
class Plan:
    """What a job builds for `train`; `init_fn` None: nothing to train (evaluation only)."""

    init_fn: Callable[[jax.Array], Any] | None
    batches: Any = None  # a Grain DatasetIterator: its position is checkpointed
    # One compiled step for train.num_steps at train.global_batch_size (most families), or
    # `segments` (PGGAN's phases).
    train_step: Callable[[Any, Any, jax.Array], tuple[Any, Mapping[str, jax.Array]]] | None = None
    segments: list[Segment] = dataclasses.field(default_factory=list)
    signature: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    abstract: Any = None  # default: jax.eval_shape(init_fn, rng)
    eval_fn: Callable[[Any, int], Mapping[str, float]] | None = None
    eval_every: int = 0
    best_metric: str | None = None  # ranks checkpoints (when eval_fn runs)
    on_restore: Callable[[Any, int], None] | None = None  # (state, start step)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # the job's own


@dataclasses.dataclass
class Ended:
    """A finished training, as `Job.finish` gets it."""

    workdir: str
    mesh: jax.sharding.Mesh
    state: Any
    step: int
    start_step: int
    history: list[dict[str, Any]]  # every session's metric rows (metrics.jsonl)
    checkpointer: checkpoint_lib.Checkpointer | None
    abstract_placed: Any
    clock: results_lib.Clock
    decision: Any  # the workdir check's outcome (workdir.Decision)
    finished: bool = True  # False: stopped early (stop_at, preemption) with a checkpoint
    preempted: bool = False

    def stopped(self) -> dict[str, Any]:
        """What `train` returns for a run that stopped before its last step."""
        return {"finished": False, "step": self.step, "preempted": self.preempted}


class Job(abc.ABC):
    """A model family's part of a run (see the module docstring)."""

    # The family's name, recorded in every checkpoint's metadata (`runs.load` reads it).
    name: str = ""
    # Fields outside the config hash that checks a resumed run is the same run.
    hash_ignore: tuple[str, ...] = ()

    @abc.abstractmethod
    def validate(self, config) -> None: ...

    def prepare(self, config, mesh) -> None:
        """Checks once the workdir is accepted, before any data read: batch sizes against the
        devices (this default), inputs the run needs (another run's workdir)."""
        parallel.check_global_batch(int(config.train.global_batch_size), mesh)

    @abc.abstractmethod
    def build(self, config, workdir: str, mesh) -> Plan: ...

    @abc.abstractmethod
    def finish(self, config, plan: Plan, ended: Ended) -> dict[str, Any]: ...


def train_iterator(
    config, source, spec, *, resolution: int, normalization: Any = "generator", **options
) -> Any:
    """A family's training input from its config: shuffle(seed), repeat, augment, batch
    (`global_batch_size`, default train.global_batch_size), as a checkpointable Grain iterator;
    `options` go to `pipeline.make_train_iterator` (labels, ...)."""
    data = config.data
    options.setdefault("global_batch_size", int(config.train.global_batch_size))
    options.setdefault("balanced", bool(data.get("balanced", False)))
    return pipeline.make_train_iterator(
        source,
        spec,
        seed=int(config.seed),
        resolution=int(resolution),
        augment=data.augment,
        normalization=normalization,
        num_workers=int(data.num_workers),
        cache_mb=float(data.get("cache_mb", 0)),
        **pipeline.bad_record_options(data),
        **options,
    )


def signature(job: Job, config, decision, plan: Plan) -> dict[str, Any]:
    """The resume signature: the config hash (less `job.hash_ignore`), the global batch and
    the job's entries (the dataset, its size, ...)."""
    hashed = config_lib.config_hash(decision.hash_config(config), ignore=job.hash_ignore)
    batch = int(config.train.global_batch_size)
    return {"config_hash": hashed, "global_batch_size": batch, **plan.signature}


def train(
    job: Job, config, workdir: str, *, stop_at: int | None = None, **workdir_options
) -> dict[str, Any]:
    """Trains (or resumes) `job` in `workdir`; returns results.json's dict, or
    {"finished": False, "step", "preempted"} when stopped (`stop_at`, SIGTERM) first.

    Re-running on the same workdir resumes exactly (state and input iterator) or returns the
    saved results of a finished run; a workdir of another config is refused before anything
    is written (`workdir.check`; `workdir_options`: overwrite, force_resume).
    """
    clock = results_lib.Clock()
    job.validate(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    decision = workdir_lib.prepare(config, workdir, **workdir_options)
    if decision.finished:
        return decision.results
    timer, start = timing.Timer(), time.perf_counter()
    with timer.compiles():
        with timer.section("setup"):
            mesh = parallel.make_mesh()
            job.prepare(config, mesh)
            plan = job.build(config, workdir, mesh)
        if plan.init_fn is None:  # evaluation only: no state, no checkpoints
            decision.record(config)
            ended = Ended(workdir, mesh, None, 0, 0, [], None, None, clock, decision)
            with timer.section("finish"):
                results = job.finish(config, plan, ended)
            return _save(results, workdir, clock, timer.summary(time.perf_counter() - start))
        with fit(job, config, workdir, plan, mesh=mesh, decision=decision, clock=clock,
                 stop_at=stop_at, timer=timer) as ended:  # fmt: skip
            if not ended.finished:
                return ended.stopped()
            with timer.section("finish"):
                results = job.finish(config, plan, ended)
            profile = timer.summary(time.perf_counter() - start, rest=STEPS)
            return _save(results, workdir, clock, profile)


@contextlib.contextmanager
def fit(
    job: Job,
    config,
    workdir: str,
    plan: Plan,
    *,
    mesh,
    decision,
    clock: results_lib.Clock,
    stop_at: int | None = None,
    timer: timing.Timer | None = None,
) -> Iterator[Ended]:
    """Restores or initialises (state, iterator), runs the plan's segments and yields how
    training ended, with the checkpointer still open (closed, with the writer, on exit).
    `timer` gets the restore ("checkpoint") and the loop's sections."""
    timer = timer or timing.Timer()
    rng = jax.random.PRNGKey(config.seed)
    abstract = plan.abstract if plan.abstract is not None else jax.eval_shape(plan.init_fn, rng)
    replicated = parallel.replicated(mesh)
    sig = signature(job, config, decision, plan)
    ranked = plan.best_metric if (plan.eval_fn and plan.eval_every) else None
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=int(config.train.keep_checkpoints),
        best_metric=ranked,
    )
    abstract_placed = checkpoint_lib.abstract_like(abstract, replicated)
    with checkpoint_lib.closing_on_error(checkpointer), timer.section("checkpoint"):
        state, start_step = checkpoint_lib.restore_or_init(
            checkpointer,
            abstract_placed,
            lambda: jax.jit(plan.init_fn, out_shardings=replicated)(rng),
            plan.batches,
            sig,
            ignore=decision.signature_ignore,
        )
        clock.resume(checkpointer.restored_meta)
        decision.record(config)  # the run is accepted: now its config.json is (re)written
    if plan.on_restore is not None:
        plan.on_restore(state, start_step)
    writer = writer_lib.MetricWriter(
        workdir, enabled=parallel.is_main_process(), resume_step=start_step
    )
    try:
        # A host copy: the state (and its rng leaf) is donated to the first step.
        base_rng = parallel.replicate(np.asarray(jax.device_get(state.rng)), mesh)
        step, history, finished, preempted = start_step, [], True, False
        for segment in plan.segments or _whole_run(config, plan):
            if step >= segment.end:
                continue
            if segment.before is not None:
                segment.before(step)
            outcome = loop.run(
                state=state,
                train_step=segment.train_step,
                batches=plan.batches,
                mesh=mesh,
                rng=base_rng,
                start_step=step,
                num_steps=segment.end,
                images_per_step=segment.images_per_step,
                checkpointer=checkpointer,
                writer=writer,
                log_every=int(config.train.log_every),
                checkpoint_every=int(config.train.checkpoint_every),
                eval_every=int(plan.eval_every),
                eval_fn=plan.eval_fn if plan.eval_every else None,
                best_metric=plan.best_metric,
                metadata={"signature": sig, "family": job.name, **segment.metadata},
                nonfinite=config.train.nonfinite,
                max_bad_fraction=pipeline.max_bad_fraction(config.data),
                stop_at=stop_at,
                clock=clock,
                timer=timer,
            )
            state, step = outcome.state, outcome.step
            history.extend(outcome.history)
            if outcome.preempted or step < segment.end:
                finished, preempted = False, outcome.preempted
                break
            if segment.after is not None:
                segment.after(state)
        writer.flush()
        if finished:
            history = writer_lib.read_history(workdir) or history  # every session's rows
        yield Ended(
            workdir, mesh, state, step, start_step, history, checkpointer, abstract_placed,
            clock, decision, finished=finished, preempted=preempted,
        )  # fmt: skip
    finally:
        writer.close()
        checkpointer.close()


def _whole_run(config, plan: Plan) -> list[Segment]:
    """One segment: `plan.train_step` for train.num_steps at train.global_batch_size."""
    batch = int(config.train.global_batch_size)
    return [Segment(int(config.train.num_steps), plan.train_step, batch)]


def _save(
    results: dict[str, Any], workdir: str, clock: results_lib.Clock, profile: dict[str, float]
) -> dict[str, Any]:
    results["wall_time_s"] = clock.total()
    results["profile"] = profile
    if parallel.is_main_process():
        results_lib.save_results(os.path.join(workdir, "results.json"), results)
    return results
