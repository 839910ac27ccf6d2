"""The one training loop every trainer runs: steps, logging, eval, checkpoints, preemption.

A trainer supplies a compiled `train_step(state, batch, rng) -> (state, metrics)`, a Grain
iterator of process-local batches and a `Checkpointer`; this loop owns everything that must
behave identically across trainers: the per-step key `fold_in(rng, step)`, host -> global
batch assembly, metric fetches only at log steps, periodic and final saves of (state, data
iterator), non-finite detection, and SIGTERM/SIGINT handling (save, wait, exit cleanly).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cxrjax import checkpoint as checkpoint_lib
from cxrjax import parallel
from cxrjax.metrics import writer as writer_lib

# Batch keys that travel to the devices; everything else (ids, provenance tags) stays home.
DEVICE_KEYS = ("image", "label", "mask", "index", "latent", "weight")


class NonFiniteError(FloatingPointError):
    """Raised (abort policy) when a loss or gradient is NaN/Inf; names step and metric."""


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


def _check_finite(step: int, scalars: Mapping[str, float]) -> None:
    for name, value in scalars.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise NonFiniteError(
                f"non-finite {name}={value} at step {step}; no checkpoint was written with it. "
                "Lower the learning rate, enable grad clipping, or set train.nonfinite='skip'."
            )


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
) -> LoopResult:
    """Runs steps `start_step+1 .. num_steps` (or until `stop_at`), saving on the way.

    Checkpoint step numbers count completed optimizer steps. `stop_at` ends the loop early
    with a checkpoint, exactly as a preemption would (used by resume tests and schedulers).
    """
    if nonfinite not in ("skip", "abort"):
        raise ValueError(f"nonfinite must be 'skip' or 'abort', got {nonfinite!r}")
    progress = writer_lib.Progress(num_steps, start_step, images_per_step, label=label)
    history: list[dict[str, float]] = []
    last_saved = start_step
    last_eval: dict[str, float] = {}
    last_eval_step = -1
    end = num_steps if stop_at is None else min(num_steps, stop_at)
    step = start_step

    def save(step: int) -> None:
        nonlocal last_saved
        if checkpointer is None or step == last_saved:
            return
        metrics = None
        if best_metric and last_eval_step == step and best_metric in last_eval:
            # Only a checkpoint evaluated at its own step competes for "best".
            metrics = {best_metric: float(last_eval[best_metric])}
        checkpointer.save(step, state, data_iterator=batches, metadata=metadata, metrics=metrics)
        last_saved = step

    with PreemptionGuard() as guard:
        while step < end:
            batch = device_batch(next(batches), mesh)
            step_rng = jax.random.fold_in(rng, step)
            state, metrics = train_step(state, batch, step_rng)
            step += 1

            is_log = step % log_every == 0 or step == end
            is_eval = (
                bool(eval_fn) and eval_every > 0 and (step % eval_every == 0 or step == num_steps)
            )
            if is_log or is_eval:
                scalars = {f"{label}/{k}": float(v) for k, v in jax.device_get(metrics).items()}
                if nonfinite == "abort":
                    _check_finite(step, scalars)
                scalars.update(progress.update(step, scalars))
                if is_eval:
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
        checkpointer.wait()
    writer.flush()
    return LoopResult(state, step, preempted=False, history=history)
