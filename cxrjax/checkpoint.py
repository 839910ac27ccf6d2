"""One Orbax CheckpointManager per workdir: the train state, the Grain iterator, metadata.

Every trainer saves and restores through `Checkpointer`, so resume, retention and recovery
behave the same for the classifier, PGGAN, DDPM and the anomaly encoder:

* items: `state` (any pytree / flax struct dataclass), `data` (the Grain iterator state, one
  file per process) and `meta` (a small JSON: step, run signature, anything JSON-able);
* retention: the newest `keep` steps plus the best by a validation metric, never deleting the
  newest (Orbax's best-only policy would);
* saves are asynchronous and atomic (Orbax commits by rename); `wait()` before exit;
* restore builds its target with `jax.eval_shape`, placed on the current mesh, so a checkpoint
  written by N processes restores on M; an unreadable newest step is set aside (renamed,
  never deleted) and the previous one restored.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

STATE, DATA, META = "state", "data", "meta"


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used (names the step and the reason)."""


def abstract_like(tree: Any, sharding: jax.sharding.Sharding | Callable[[Any], Any]) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or eval_shape output) carrying target shardings."""
    pick = sharding if callable(sharding) else (lambda _: sharding)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=pick(x)), tree)


class Checkpointer:
    """Saves/restores (state, data iterator, metadata) under `directory`."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
    ):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = epath.Path(directory).absolute()
        self.best_metric = best_metric
        self.best_mode = best_mode
        policies: list[Any] = [checkpoint_managers.LatestN(n=max(1, keep))]
        if best_metric:
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics[best_metric],
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            # best_fn only makes Orbax write/read per-step metrics; retention is the policy.
            best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
            best_mode=best_mode,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=(STATE, DATA, META),
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA: grain.checkpoint.CheckpointHandler(),
                META: ocp.JsonCheckpointHandler(),
            },
        )

    # -- queries ---------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric` (None without metric or metrics).

        Computed here: Orbax's own best_step only knows `best_fn`, which would also switch on
        its best-only deletion policy.
        """
        if not self.best_metric:
            return None
        scored = []
        for step in self.all_steps():
            metrics = self._manager.metrics(step) or {}
            if self.best_metric in metrics:
                scored.append((float(metrics[self.best_metric]), step))
        if not scored:
            return None
        sign = 1.0 if self.best_mode == "max" else -1.0
        # Ties go to the earlier step (the first time that value was reached).
        return max(scored, key=lambda item: (sign * item[0], -item[1]))[1]

    # -- save ------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iterator: grain.DatasetIterator | None = None,
        metadata: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        force: bool = True,
    ) -> bool:
        """Starts an async save of `step`; every process must call it (collective)."""
        items = {
            STATE: ocp.args.StandardSave(state),
            META: ocp.args.JsonSave(dict(metadata or {}, step=int(step))),
        }
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        saved = self._manager.save(
            int(step),
            args=ocp.args.Composite(**items),
            metrics=dict(metrics) if metrics else None,
            force=force,
        )
        return bool(saved)

    def wait(self) -> None:
        """Blocks until pending async saves are committed; raises if one failed."""
        self._manager.wait_until_finished()
        self._manager.check_for_errors()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # -- restore ---------------------------------------------------------------------------
    def restore(
        self,
        step: int,
        abstract_state: Any,
        *,
        data_iterator: grain.DatasetIterator | None = None,
    ) -> tuple[Any, dict]:
        """Restores `step` into the shapes/shardings of `abstract_state` (and the iterator)."""
        items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
        if data_iterator is not None:
            if not (self.directory / str(step) / DATA).exists():
                raise CheckpointError(
                    f"step {step} in {self.directory} has no data-iterator state to resume from"
                )
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
        return restored[STATE], dict(restored[META] or {})

    def restore_latest(
        self, abstract_state: Any, *, data_iterator: grain.DatasetIterator | None = None
    ) -> tuple[Any, dict] | None:
        """Restores the newest readable step, setting unreadable newer ones aside.

        Returns None only when the workdir holds no committed checkpoint at all; a run never
        silently starts from scratch over a checkpoint it could not read.
        """
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                return self.restore(step, abstract_state, data_iterator=data_iterator)
            except Exception as error:  # noqa: BLE001 - any read failure means "unusable step"
                if step == steps[0]:
                    raise CheckpointError(
                        f"no readable checkpoint in {self.directory}: step {step} failed with "
                        f"{type(error).__name__}: {error}"
                    ) from error
                aside = self._set_aside(step)
                logging.error(
                    "checkpoint step %d is unreadable (%s: %s); moved to %s, trying the previous "
                    "step",
                    step,
                    type(error).__name__,
                    error,
                    aside,
                )
        return None

    def _set_aside(self, step: int) -> epath.Path:
        source = self.directory / str(step)
        target = self.directory / f"corrupt-{step}"
        suffix = 0
        while target.exists():
            suffix += 1
            target = self.directory / f"corrupt-{step}-{suffix}"
        if jax.process_index() == 0:
            source.rename(target)
        # The manager caches its step list; rebuild it so the set-aside step is forgotten.
        self._manager.reload()
        return target


def restore_or_init(
    checkpointer: Checkpointer,
    abstract: Any,
    init_fn: Callable[[], Any],
    data_iterator: grain.DatasetIterator | None,
    signature: Mapping[str, Any],
) -> tuple[Any, int]:
    """(state, start step): the newest readable checkpoint, or `init_fn()` and step 0.

    A checkpoint whose saved run signature (config hash, global batch, dataset, ...) differs
    from `signature` is refused with a message naming each difference: resuming it would
    silently continue a different experiment.
    """
    restored = checkpointer.restore_latest(abstract, data_iterator=data_iterator)
    if restored is None:
        return init_fn(), 0
    state, meta = restored
    saved = meta.get("signature", {})
    different = {k: (saved.get(k), v) for k, v in signature.items() if saved.get(k) != v}
    if different:
        details = ", ".join(
            f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in different.items()
        )
        raise CheckpointError(
            f"the checkpoint in {checkpointer.directory} was written by a different setup "
            f"({details}); use a new --workdir or restore the original config"
        )
    logging.info("resumed from step %d in %s", meta["step"], checkpointer.directory)
    return state, int(meta["step"])
