"""The one training loop every trainer runs: steps, logging, eval, checkpoints, preemption.

A trainer supplies a compiled `train_step(state, batch, rng) -> (state, metrics)`, a Grain
iterator of process-local batches and a `Checkpointer`; this loop owns everything that must
behave identically across trainers: the per-step key `fold_in(rng, step)`, host -> global
batch assembly, metric fetches only at log steps, periodic and final saves of (state, data
iterator), non-finite detection, counting of masked (unreadable) input records, and
SIGTERM/SIGINT handling (save, wait, exit cleanly).

Guarantees every trainer gets from here:
* a checkpoint never holds a non-finite state: each save first checks every float leaf
  (one small jitted reduction) and refuses, naming the leaf and step;
* `nonfinite="abort"` checks the step's metrics after every step (one small host fetch per
  step), so the error names the exact step and metric; "skip" counts skipped updates (the
  steps skip them in-graph) and reports them at log steps;
* "skip" stops with NonFiniteError, naming the first non-finite step, once every update of
  a whole stretch (>= max(log_every, 2) steps) was skipped: a run whose every step is
  non-finite (a broken state) never trains on silently to a NaN evaluation;
* a failed save raises (with the step) instead of letting the run end 0 without a checkpoint;
* batches with a `mask` field (pipeline `bad_records="mask"`) have their masked rows counted
  over all processes at log steps; above `max_bad_fraction` of the examples seen, the run stops.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cxrjax import checkpoint as checkpoint_lib
from cxrjax import config as config_lib
from cxrjax import parallel, timing
from cxrjax.metrics import writer as writer_lib

# Batch keys that travel to the devices; everything else (ids, provenance tags) stays home.
DEVICE_KEYS = ("image", "label", "mask", "index", "latent", "weight")


class NonFiniteError(FloatingPointError):
    """Raised (abort policy) when a loss or gradient is NaN/Inf; names step and metric."""


class BadRecordsError(RuntimeError):
    """Too many unreadable input records were masked; names the counts and the threshold."""


class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a flag the loop polls, so a save can finish first."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self._signals = signals
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self.signal_name: str | None = None

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        del frame
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def requested(self, step: int) -> bool:
        """True on every process at the same step once any process got the signal."""
        local = self._event.is_set()
        if jax.process_count() == 1:
            return local
        # JAX's distributed runtime also notices cluster preemption notices at sync points.
        flags = multihost_utils.process_allgather(np.asarray([local], np.int32))
        return bool(np.any(flags)) or multihost_utils.reached_preemption_sync_point(step)


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    preempted: bool = False
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


def device_batch(batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """The numeric fields of a process-local batch as global arrays sharded over "data"."""
    return parallel.host_to_global({k: v for k, v in batch.items() if k in DEVICE_KEYS}, mesh)


class _SkipWatch:
    """Under "skip": raises once every update of a stretch of >= `patience` steps was skipped.

    Reads the state's cumulative `nonfinite_steps` counter at the fetches the loop already
    does, so it costs nothing between log steps.
    """

    def __init__(self, start_step: int, count: float | None, patience: int):
        self.last_step, self.last_count = start_step, count
        self.patience = max(patience, 2)
        self.stretch_start: int | None = None  # first step of the current all-skipped stretch
        self.first_bad: str | None = None

    def update(self, step: int, count: float | None) -> None:
        if count is None or self.last_count is None:
            self.last_step, self.last_count = step, count
            return
        steps, skipped = step - self.last_step, count - self.last_count
        if skipped > 0 and self.first_bad is None:
            exact = skipped >= steps
            self.first_bad = (
                str(self.last_step + 1) if exact else f"in {self.last_step + 1}..{step}"
            )
        if steps > 0 and skipped >= steps:
            self.stretch_start = self.stretch_start or self.last_step + 1
        else:
            self.stretch_start = None
        self.last_step, self.last_count = step, count
        if self.stretch_start is not None and step - self.stretch_start + 1 >= self.patience:
            raise NonFiniteError(
                f"every update from step {self.stretch_start} to {step} was non-finite and "
                f"skipped (first non-finite step {self.first_bad}); the state cannot train on. "
                "Lower the learning rate or enable grad clipping, and resume from an earlier "
                "checkpoint or a new --workdir."
            )


def _check_finite(step: int, scalars: Mapping[str, float], skipped_before: float | None) -> None:
    """Raises NonFiniteError naming the step and every non-finite metric.

    A step that skipped its update in-graph reports it by raising `*/nonfinite_steps`; that
    counts too, even when the logged loss itself is finite (a NaN gradient).
    """
    bad = [k for k, v in scalars.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        counter = next((k for k in scalars if k.endswith("/nonfinite_steps")), None)
        if counter is None or skipped_before is None or scalars[counter] <= skipped_before:
            return
        bad = [counter]
    named = ", ".join(f"{name}={scalars[name]}" for name in bad)
    raise NonFiniteError(
        f"non-finite {named} at step {step}; the update was not applied and no "
        "checkpoint holds it. Lower the learning rate, enable grad clipping, or set "
        "train.nonfinite='skip'."
    )


@jax.jit
def _finite_leaves(tree: Any) -> list[jax.Array]:
    return [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]


def check_state_finite(state: Any, step: int) -> None:
    """Raises NonFiniteError naming the first float leaf of `state` holding a NaN/Inf."""
    paths, leaves = [], []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact):
            paths.append(jax.tree_util.keystr(path))
            leaves.append(leaf)
    if not leaves:
        return
    for path, finite in zip(paths, jax.device_get(_finite_leaves(leaves)), strict=True):
        if not finite:
            raise NonFiniteError(
                f"the train state has non-finite values in {path} at step {step}; it was not "
                "checkpointed (the previous checkpoint is intact). Lower the learning rate or "
                "enable grad clipping."
            )


class _BadRecordCounter:
    """Counts masked (unreadable, substituted) rows of the training batches, all processes."""

    def __init__(self, max_fraction: float):
        self.max_fraction = max_fraction
        self.local_bad = 0
        self.local_seen = 0
        self.active = False

    def add(self, batch: Mapping[str, Any]) -> None:
        if "mask" in batch:
            self.active = True
            mask = np.asarray(batch["mask"], bool)
            self.local_bad += int(mask.size - mask.sum())
            self.local_seen += int(mask.size)

    def check(self, step: int) -> dict[str, float]:
        """Global counts as metrics; raises BadRecordsError above the allowed fraction.

        Every process holds a mask (same pipeline), so the gather is a collective they all
        reach at the same log step.
        """
        if not self.active:
            return {}
        counts = np.asarray([self.local_bad, self.local_seen], np.int64)
        if jax.process_count() > 1:
            counts = np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)
        bad, seen = int(counts[0]), int(counts[1])
        # Judged once enough examples are in for the fraction to mean something.
        if seen >= 1.0 / max(self.max_fraction, 1e-12) and bad > self.max_fraction * seen:
            raise BadRecordsError(
                f"{bad} of the {seen} training examples read so far (by step {step}) were "
                f"unreadable and masked, above the allowed fraction {self.max_fraction}; the "
                "warnings above name them. Rebuild the dataset (prepare_data --skip_corrupt) or "
                "raise the allowed fraction."
            )
        return {"data/bad_records": float(bad), "data/bad_fraction": bad / max(seen, 1)}


def run(
    *,
    state: Any,
    train_step: Callable[[Any, Any, jax.Array], tuple[Any, Mapping[str, jax.Array]]],
    batches: Iterator[Mapping[str, Any]],
    mesh: jax.sharding.Mesh,
    rng: jax.Array,
    start_step: int,
    num_steps: int,
    images_per_step: int,
    checkpointer: checkpoint_lib.Checkpointer | None,
    writer: writer_lib.MetricWriter,
    log_every: int = 50,
    checkpoint_every: int = 0,
    eval_every: int = 0,
    eval_fn: Callable[[Any, int], Mapping[str, float]] | None = None,
    best_metric: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    nonfinite: str = "skip",
    label: str = "train",
    stop_at: int | None = None,
    max_bad_fraction: float = 0.01,
    clock: Any | None = None,
    timer: timing.Timer | None = None,
) -> LoopResult:
    """Runs steps `start_step+1 .. num_steps` (or until `stop_at`), saving on the way.

    Checkpoint step numbers count completed optimizer steps. `stop_at` ends the loop early
    with a checkpoint, exactly as a preemption would (used by resume tests and schedulers).
    `max_bad_fraction`: the share of masked (unreadable) input records, over the examples this
    session has read, above which the run stops with BadRecordsError (checked at log steps).
    `clock` (results.Clock): its total wall time so far is saved in every checkpoint's
    metadata, so a resumed run's wall time counts every session. `timer` (timing.Timer) gets
    the seconds spent waiting for input ("data"), evaluating ("eval") and saving ("checkpoint").
    Raises NonFiniteError (see the module docstring), BadRecordsError, or
    checkpoint.CheckpointError when a save fails.
    """
    if nonfinite not in ("skip", "abort"):
        raise config_lib.ConfigError(
            f"config.train.nonfinite: must be one of ['skip', 'abort'], got {nonfinite!r}"
        )
    progress = writer_lib.Progress(num_steps, start_step, images_per_step, label=label)
    timer = timer or timing.Timer()
    history: list[dict[str, float]] = []
    last_saved = start_step
    last_eval: dict[str, float] = {}
    last_eval_step = -1
    end = num_steps if stop_at is None else min(num_steps, stop_at)
    step = start_step
    bad_records = _BadRecordCounter(max_bad_fraction)
    skipped_before: float | None = None  # `*/nonfinite_steps` after the previous fetch
    counter = getattr(state, "nonfinite_steps", None)
    skip_watch = _SkipWatch(
        start_step,
        None if counter is None else float(jax.device_get(counter)),
        log_every,
    )

    def save(step: int) -> None:
        nonlocal last_saved
        if checkpointer is None or step == last_saved:
            return
        check_state_finite(state, step)
        metrics = None
        if best_metric and last_eval_step == step and best_metric in last_eval:
            # Only a checkpoint evaluated at its own step competes for "best".
            metrics = {best_metric: float(last_eval[best_metric])}
        meta = dict(metadata or {})
        if clock is not None:
            meta["wall_time_s"] = clock.total()
        with timer.section("checkpoint"):
            checkpointer.save(step, state, data_iterator=batches, metadata=meta, metrics=metrics)
        last_saved = step

    with PreemptionGuard() as guard:
        while step < end:
            with timer.section("data"):
                host_batch = next(batches)
            bad_records.add(host_batch)
            batch = device_batch(host_batch, mesh)
            step_rng = jax.random.fold_in(rng, step)
            state, metrics = train_step(state, batch, step_rng)
            step += 1

            is_log = step % log_every == 0 or step == end
            is_eval = (
                bool(eval_fn) and eval_every > 0 and (step % eval_every == 0 or step == num_steps)
            )
            if is_log or is_eval or nonfinite == "abort":
                # "abort" looks at every step, so the error names the step where it happened
                # (and no periodic save runs after it).
                scalars = {f"{label}/{k}": float(v) for k, v in jax.device_get(metrics).items()}
                if nonfinite == "abort":
                    _check_finite(step, scalars, skipped_before)
                skipped_before = scalars.get(f"{label}/nonfinite_steps", skipped_before)
                if nonfinite == "skip":
                    skip_watch.update(step, scalars.get(f"{label}/nonfinite_steps"))
            if is_log or is_eval:
                if is_log:
                    scalars.update(bad_records.check(step))
                scalars.update(progress.update(step, scalars))
                if is_eval:
                    with timer.section("eval"):
                        last_eval, last_eval_step = dict(eval_fn(state, step)), step
                    progress.exclude_elapsed()  # images/s and ETA count training steps only
                    scalars.update(last_eval)
                    logging.info(
                        "[eval] step %d %s",
                        step,
                        " ".join(f"{k}={v:.4f}" for k, v in last_eval.items()),
                    )
                writer.write_scalars(step, scalars)
                history.append({"step": step, **scalars})
            if checkpoint_every and step % checkpoint_every == 0:
                save(step)
            # Across processes the check is a collective: do it at log steps only, so the
            # step loop never waits on the host in between.
            check_now = jax.process_count() == 1 or is_log
            if check_now and guard.requested(step) and step < end:
                save(step)
                if checkpointer is not None:
                    with timer.section("checkpoint"):
                        checkpointer.wait()
                logging.warning(
                    "preempted (%s) at step %d; checkpoint committed. Re-run the same command to "
                    "resume.",
                    guard.signal_name or "cluster notice",
                    step,
                )
                writer.flush()
                return LoopResult(state, step, preempted=True, history=history)
    save(step)
    if checkpointer is not None:
        with timer.section("checkpoint"):
            checkpointer.wait()
    writer.flush()
    return LoopResult(state, step, preempted=False, history=history)
