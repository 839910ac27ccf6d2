"""One Orbax CheckpointManager per workdir: the train state, the Grain iterator, metadata.

Every trainer saves and restores through `Checkpointer`, so resume, retention and recovery
behave the same for the classifier, PGGAN, DDPM and the anomaly encoder:

* items: `state` (any pytree / flax struct dataclass), `data` (the Grain iterator state, one
  file per process) and `meta` (a small JSON: step, run signature, anything JSON-able);
* retention: the newest `keep` steps plus the best by a validation metric, never deleting the
  newest (Orbax's best-only policy would);
* saves are asynchronous and atomic (Orbax writes `<step>.orbax-checkpoint-tmp*` and commits
  by renaming it): a process killed mid-save leaves only that temporary folder, which the next
  start logs and removes, resuming from the last committed step; `wait()` before exit;
* a save that fails (now or in the background) raises CheckpointError naming the step, so a
  run never ends with exit 0 and a lost checkpoint;
* restore builds its target with `jax.eval_shape`, placed on the current mesh, so a checkpoint
  written by N processes restores on M, data-iterator position included (the pipeline's state
  is process-count independent, see `_restore_iterator`); an unreadable newest step is set
  aside (renamed, never deleted) and the previous one restored;
* every save records a content checksum of the state (per leaf, computed on device: a
  position-weighted uint32 sum of the raw bits, so any single flipped bit changes it) in its
  metadata; a restore recomputes it and also checks every float is finite, so a checkpoint
  whose bytes changed after the save (bit rot, a bad copy) counts as unreadable: set aside,
  and the previous step restored, instead of resuming NaNs.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging as pylogging
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

STATE, DATA, META = "state", "data", "meta"


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used, or cannot be written (names the step)."""


# Orbax's name for a step folder still being written (renamed to "<step>" on commit).
_UNCOMMITTED = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


CHECKSUM_ALGORITHM = "u32-weighted-bit-sum-v2"  # {leaf path: sum}


def _leaf_bits(x: jax.Array) -> jax.Array:
    """The raw bits of `x` as uint32 (one element per 1/2/4 bytes, two per 8)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _fingerprint(leaves: list[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
    """(checksum, all finite) per leaf. Odd weights make every single-bit change visible;
    uint32 sums wrap exactly, so the value does not depend on sharding or device count."""
    sums, finite = [], []
    for x in leaves:
        bits = _leaf_bits(x).reshape(-1)
        index = jnp.arange(bits.size, dtype=jnp.uint32)
        weights = (index * jnp.uint32(2654435761)) | jnp.uint32(1)
        sums.append(jnp.sum(bits * weights, dtype=jnp.uint32))
        inexact = jnp.issubdtype(x.dtype, jnp.inexact)
        finite.append(jnp.all(jnp.isfinite(x)) if inexact else jnp.bool_(True))
    return sums, finite


def _path_name(path) -> str:
    """ "params/block/kernel" for a leaf path, the same for a dataclass and a restored dict."""
    parts = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def fingerprint(state: Any) -> tuple[list[str], list[int], list[bool]]:
    """(leaf paths, checksums, finite flags) of a pytree of arrays."""
    paths, leaves = [], []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
            paths.append(_path_name(path))
            leaves.append(leaf)
    if not leaves:
        return [], [], []
    sums, finite = jax.device_get(_fingerprint(leaves))
    return paths, [int(s) for s in sums], [bool(f) for f in finite]


def verify(state: Any, meta: Mapping[str, Any], step: int) -> None:
    """Raises CheckpointError when the restored state is not what was saved at `step`."""
    paths, sums, finite = fingerprint(state)
    recorded = (meta or {}).get("checksum")
    if recorded and recorded.get("algorithm") == CHECKSUM_ALGORITHM:
        saved_sums = recorded["leaves"]
        for path, now in zip(paths, sums, strict=True):
            # A leaf saved as a Python scalar has no checksum (Orbax restores it as an array).
            if path in saved_sums and int(saved_sums[path]) != now:
                raise CheckpointError(
                    f"step {step}: the content of {path} differs from what was saved "
                    "(checksum mismatch: the files changed after the save)"
                )
    bad = [path for path, ok in zip(paths, finite, strict=True) if not ok]
    if bad:
        raise CheckpointError(
            f"step {step}: non-finite values in {bad[0]} (a saved state never has them)"
        )


def short_error(error: BaseException, limit: int = 240) -> str:
    """`Type: first line of the message`, at most `limit` characters (TensorStore specs are
    dozens of lines). A CheckpointError is already short: its message alone."""
    if isinstance(error, CheckpointError):
        return str(error)
    while error.__cause__ is not None and "See full TensorStore details" in str(error):
        error = error.__cause__  # Orbax's wrapper names an index; its cause names the file
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# What a failed Orbax restore leaves behind. Orbax gathers every array read of a step, raises on
# the first failure and closes its event loop with the sibling reads still in flight: as each
# finishes, TensorStore's callback finds the loop closed, and each abandoned read coroutine
# raises again when it is finalized (at interpreter exit, after the run's one `error:` line).
# None of it is news: the failure that caused it was raised. It goes to the debug log.
_ABANDONED_READ_LOGS = (
    "Future exception was never retrieved",
    "Task exception was never retrieved",
    "Task was destroyed but it is pending",
)


def _is_abandoned_read(unraisable) -> bool:
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None:
        return "orbax" in code.co_filename
    error = unraisable.exc_value
    return (
        unraisable.object is None
        and isinstance(error, RuntimeError)
        and str(error) == "Event loop is closed"
    )


class _AbandonedReadLogs(pylogging.Filter):
    def filter(self, record: pylogging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(_ABANDONED_READ_LOGS) and re.search(
            r"ocdbt|orbax|tensorstore", message, re.IGNORECASE
        ):
            logging.debug("abandoned checkpoint read: %s", message.splitlines()[-1][:240])
            return False
        return True


def quiet_abandoned_reads() -> None:
    """Sends what a failed restore's abandoned reads print to the debug log (idempotent).

    Process-wide because they surface from TensorStore's threads and at exit, after the
    restore returned; everything else reaches the previous hook and the asyncio log as before.
    """
    if not getattr(sys.unraisablehook, "cxrjax_abandoned_reads", False):
        previous = sys.unraisablehook

        def hook(unraisable):
            if _is_abandoned_read(unraisable):
                logging.debug("abandoned checkpoint read: %s", short_error(unraisable.exc_value))
            else:
                previous(unraisable)

        hook.cxrjax_abandoned_reads = True
        sys.unraisablehook = hook
    asyncio_log = pylogging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedReadLogs) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedReadLogs())


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
        self._pending_step: int | None = None  # the newest step handed to an async save
        self.restored_meta: dict[str, Any] = {}  # metadata of the step restore_latest loaded
        self._failed = False  # a save error was raised already (close() must not re-raise)
        self._log_uncommitted()
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

    def _log_uncommitted(self) -> None:
        """Names the saves a killed process left half-written (Orbax removes them on start)."""
        if jax.process_index() != 0 or not self.directory.exists():
            return
        for path in sorted(self.directory.iterdir()):
            match = _UNCOMMITTED.match(path.name)
            if match:
                logging.warning(
                    "ignoring the uncommitted checkpoint of step %s (%s): its save was "
                    "interrupted; resuming from the last committed step",
                    match.group(1),
                    path,
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
        paths, sums, _ = fingerprint(state)
        checksum = {"algorithm": CHECKSUM_ALGORITHM, "leaves": dict(zip(paths, sums, strict=True))}
        items = {
            STATE: ocp.args.StandardSave(state),
            META: ocp.args.JsonSave(dict(metadata or {}, step=int(step), checksum=checksum)),
        }
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        previous = self._pending_step
        self._pending_step = int(step)
        try:
            saved = self._manager.save(
                int(step),
                args=ocp.args.Composite(**items),
                metrics=dict(metrics) if metrics else None,
                force=force,
            )
        except Exception as error:
            # Orbax first waits for the previous async save, so its failure surfaces here.
            raise self._save_error(error, f"step {previous} or {step}") from error
        return bool(saved)

    def wait(self) -> None:
        """Blocks until pending async saves are committed; raises CheckpointError if one failed."""
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as error:
            raise self._save_error(error, f"step {self._pending_step}") from error

    def _save_error(self, error: Exception, which: str) -> CheckpointError:
        self._failed = True
        return CheckpointError(
            f"saving the checkpoint of {which} in {self.directory} failed "
            f"({type(error).__name__}: {error}); the newest committed step is "
            f"{self._committed_step()}. Free space / fix the directory and re-run the same "
            "command to resume from there."
        )

    def _committed_step(self) -> int | None:
        steps = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()]
        return max(steps, default=None)

    def close(self) -> None:
        """Waits for pending saves and releases the manager. A failed save raises
        CheckpointError, unless it was raised already (close() runs in `finally` blocks)."""
        already_failed = self._failed
        try:
            self.wait()
        except CheckpointError:
            if not already_failed:
                raise
        finally:
            # Orbax's close() does not wait for the temporary-folder cleanup it starts in the
            # background at construction; a process exiting right after (a "no checkpoint"
            # error) then printed that thread's shutdown traceback.
            cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
            if cleanup is not None:
                with contextlib.suppress(Exception):
                    cleanup()
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 - the failure was reported by wait()
                if not self._failed:
                    raise

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
        data_dir = self.directory / str(step) / DATA
        translate = False
        if data_iterator is not None:
            if not data_dir.exists():
                raise CheckpointError(
                    f"step {step} in {self.directory} has no data-iterator state to resume from"
                )
            own = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
            if own.exists():
                items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
            else:
                translate = True  # written by another process count
        quiet_abandoned_reads()  # before: the first abandoned read can fail before we return
        failure = None
        try:
            restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
        except Exception as error:  # noqa: BLE001 - re-raised below, once its reads are gone
            failure = short_error(error)  # the traceback holds the abandoned reads: drop it
        if failure is not None:
            gc.collect()  # finalize them now, under the hook, not at interpreter exit
            raise CheckpointError(f"step {step}: {failure}")
        meta = dict(restored[META] or {})
        verify(restored[STATE], meta, step)
        if translate:
            _restore_iterator(step, data_dir, data_iterator)
        return restored[STATE], meta

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
                restored = self.restore(step, abstract_state, data_iterator=data_iterator)
            except Exception as error:  # noqa: BLE001 - any read failure means "unusable step"
                if step == steps[0]:
                    raise CheckpointError(
                        f"no readable checkpoint in {self.directory} ({short_error(error)}); "
                        "move it away to start from scratch, or use a new --workdir"
                    ) from None
                aside = self._set_aside(step)
                logging.error(
                    "checkpoint step %d is unreadable (%s); moved to %s, trying the previous step",
                    step,
                    short_error(error),
                    aside,
                )
                continue
            self.restored_meta = restored[1]
            return restored
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
        if jax.process_count() > 1:
            # Every process must see the rename before it reloads the step list.
            multihost_utils.sync_global_devices(f"cxrjax-set-aside-{step}")
        # The manager caches its step list; rebuild it so the set-aside step is forgotten.
        self._manager.reload()
        return target


@contextlib.contextmanager
def closing_on_error(checkpointer: Checkpointer):
    """Closes `checkpointer` when the block raises (e.g. a refused resume), so Orbax's
    background threads never print their own traceback at interpreter exit."""
    try:
        yield checkpointer
    except BaseException:
        with contextlib.suppress(Exception):
            checkpointer.close()
        raise


def _restore_iterator(step: int, data_dir: epath.Path, iterator: grain.DatasetIterator) -> None:
    """Resumes `iterator` from a step saved by a different number of processes.

    cxrjax pipelines batch before `to_iter_dataset`, and every process reads its rows of the
    same global batches, so the iterator state (the next global batch) is the same on every
    process and any process count can take it over. States that differ between the saving
    processes (some other pipeline) are refused rather than guessed.
    """
    files = sorted(data_dir.glob("process_*-of-*.json"))
    texts = {path.read_text() for path in files}
    if len(texts) != 1:
        raise CheckpointError(
            f"step {step}'s data-iterator state ({len(files)} files in {data_dir}) is not "
            f"shared by its processes, so {jax.process_count()} process(es) cannot take it "
            "over; resume with the process count that wrote it"
        )
    iterator.set_state(json.loads(texts.pop()))
    if hasattr(iterator, "start_prefetch"):
        iterator.start_prefetch()
    logging.warning(
        "step %d was saved by %d process(es); its data position carries over to %d",
        step,
        len(files),
        jax.process_count(),
    )


def restore_or_init(
    checkpointer: Checkpointer,
    abstract: Any,
    init_fn: Callable[[], Any],
    data_iterator: grain.DatasetIterator | None,
    signature: Mapping[str, Any],
    *,
    ignore: tuple[str, ...] = (),
) -> tuple[Any, int]:
    """(state, start step): the newest readable checkpoint, or `init_fn()` and step 0.

    A checkpoint whose saved run signature (config hash, global batch, dataset, ...) differs
    from `signature` is refused with a message naming each difference: resuming it would
    silently continue a different experiment. Keys in `ignore` are not compared (a resume
    the user forced after the workdir check named the config fields that differ).
    """
    restored = checkpointer.restore_latest(abstract, data_iterator=data_iterator)
    if restored is None:
        return init_fn(), 0
    state, meta = restored
    saved = meta.get("signature", {})
    different = {
        k: (saved.get(k), v) for k, v in signature.items() if saved.get(k) != v and k not in ignore
    }
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
