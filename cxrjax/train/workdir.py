"""What a command may do with a workdir: the one check every trainer runs before writing.

Every run records the config it was trained with (`config.json`). Any later command on that
workdir compares the requested config with the recorded one, before anything is written, and:

* proceeds when nothing differs, or only `HARMLESS` fields do (logging cadence, eval batch
  size, input workers: they never change a number the run reports); a finished run then
  returns its saved results;
* refuses with `WorkdirConfigError` (a ConfigError: one line, exit 2 from the launchers)
  naming every differing field `old -> new` and what to do: a new --workdir, `--overwrite`
  (discard the old run's files and start again) or, for an unfinished run,
  `--force_resume` (continue its checkpoint with the new values; recorded in
  `config_changes.json`).

`check` only reads; `prepare` also carries out `--overwrite`; `Decision.record` writes
config.json (atomically) once the run has really started (after its checkpoint was accepted),
so a refused command never leaves the new config behind for evaluate / features / synthesize
to read. The experiment calls `check` per sub-run with the sub-run's config.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from cxrjax import config as config_lib
from cxrjax import fileio

# Fields that may differ between the recorded and the requested config: they change how often
# a run logs or how fast it reads/evaluates, never a number it reports.
HARMLESS = ("train.log_every", "eval.batch_size", "eval.figures", *config_lib.THROUGHPUT_FIELDS)
CONFIG_FILE, RESULTS_FILE, CHANGES_FILE = "config.json", "results.json", "config_changes.json"
# What --overwrite removes: the files runs write, never anything else in the folder.
RUN_FILES = (
    CONFIG_FILE,
    RESULTS_FILE,
    CHANGES_FILE,
    "results.md",
    "metrics.jsonl",
    "checkpoints",
    "tensorboard",
    "samples",
    "eval_*",
    "*_predictions.npz",
    "*_scores.npz",
    "roc.png",
    "residuals.png",
)
NEW, RESUME, FINISHED = "new", "resume", "finished"


class WorkdirConfigError(config_lib.ConfigError):
    """The workdir holds a run of another config (the message names each field)."""


@dataclasses.dataclass(frozen=True)
class Difference:
    field: str
    recorded: Any
    requested: Any
    harmless: bool

    def __str__(self) -> str:
        old = "(absent)" if self.recorded is _ABSENT else _show(self.recorded)
        return f"{self.field} {old} -> {_show(self.requested)}"


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


@dataclasses.dataclass
class Decision:
    """The outcome of `check`: proceed as `state` (new / resume / finished)."""

    workdir: str
    state: str
    differences: list[Difference]  # harmless ones, or every one when forced
    forced: bool = False
    recorded: dict[str, Any] | None = None
    results: dict[str, Any] | None = None  # the saved results of a finished run

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    @property
    def signature_ignore(self) -> tuple[str, ...]:
        """Checkpoint-signature keys a forced resume no longer compares (the config hash)."""
        return ("config_hash",) if self.forced else ()

    def hash_config(self, config: Any) -> ml_collections.ConfigDict:
        """`config` with harmless fields at their recorded values: the config the checkpoint
        signature hashes, so a harmless change never trips the signature check."""
        copy = ml_collections.ConfigDict(config_lib.to_dict(config))
        for diff in self.differences:
            if diff.harmless and diff.recorded is not _ABSENT:
                *parents, leaf = diff.field.split(".")
                node = copy
                for part in parents:
                    node = node[part]
                with node.ignore_type():
                    node[leaf] = diff.recorded
        return copy

    def record(self, config: Any) -> None:
        """Writes config.json (process 0, atomically); a forced change is appended to
        config_changes.json with the time and the fields."""
        if jax.process_index() != 0:
            return
        if self.forced and self.differences:
            path = os.path.join(self.workdir, CHANGES_FILE)
            changes = json.loads(fileio.read_text(path)) if os.path.exists(path) else []
            changes.append(
                {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "changes": [
                        {"field": d.field, "old": _plain(d.recorded), "new": d.requested}
                        for d in self.differences
                    ],
                }
            )
            fileio.write_json(path, changes)
        config_lib.save_json(config, os.path.join(self.workdir, CONFIG_FILE))


def _plain(value: Any) -> Any:
    return None if value is _ABSENT else value


def _normalise(tree: Any) -> Any:
    return json.loads(json.dumps(config_lib.to_dict(tree), default=str))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(
    recorded: Mapping[str, Any], requested: Any, harmless: Sequence[str] = HARMLESS
) -> list[Difference]:
    """Every field whose requested value differs from the recorded one, in field order.

    A field the recorded config lacks (added to the configs after that run) counts only when
    the requested value is not empty/zero/False (new fields default to "off"); a field only
    the recorded config has (removed since) is ignored.
    """
    old = _flatten(_normalise(recorded))
    new = _flatten(_normalise(requested))
    out = []
    for field, value in new.items():
        if field not in old:
            if value in (None, "", 0, False, [], {}):
                continue
            before = _ABSENT
        elif old[field] == value:
            continue
        else:
            before = old[field]
        out.append(Difference(field, before, value, harmless=field in harmless))
    return out


def read_recorded(workdir: str) -> dict[str, Any] | None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        return json.loads(fileio.read_text(path))
    except (OSError, json.JSONDecodeError) as error:
        raise WorkdirConfigError(
            f"{path} is unreadable ({error}); use a new --workdir, or --overwrite to start "
            "this one again"
        ) from None


def _has_run(workdir: str) -> bool:
    checkpoints = os.path.join(workdir, "checkpoints")
    has_steps = os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))
    return has_steps or os.path.exists(os.path.join(workdir, RESULTS_FILE))


def check(
    config: Any,
    workdir: str,
    *,
    harmless: Sequence[str] = HARMLESS,
    overwrite: bool = False,
    force_resume: bool = False,
) -> Decision:
    """Compares `config` with the config recorded in `workdir`; reads only, writes nothing.

    Returns a Decision (new / resume / finished, with the saved results); raises
    WorkdirConfigError naming each differing field (old -> new) and the ways out. With
    `overwrite` a workdir of another config is accepted as "new" (`prepare` then removes the
    old run's files); with `force_resume` an unfinished run continues with the new values.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if overwrite and force_resume:
        raise config_lib.ConfigError("--overwrite and --force_resume exclude each other")
    recorded = read_recorded(workdir) if os.path.isdir(workdir) else None
    results_path = os.path.join(workdir, RESULTS_FILE)
    finished = os.path.exists(results_path)
    if overwrite:
        return Decision(workdir, NEW, [], recorded=recorded)
    if recorded is None:
        if os.path.isdir(workdir) and _has_run(workdir):
            raise WorkdirConfigError(
                f"--workdir={workdir} holds a run but no {CONFIG_FILE}, so its config is "
                "unknown; use a new --workdir, or --overwrite to start this one again"
            )
        return Decision(workdir, NEW, [])
    diffs = differences(recorded, config, harmless)
    harmful = [d for d in diffs if not d.harmless]
    if harmful and not (force_resume and not finished):
        listed = ", ".join(str(d) for d in harmful)
        ways = "use a new --workdir, or --overwrite to discard it and train again"
        if not finished:
            ways += ", or --force_resume to continue its checkpoint with the new values"
        what = "finished run" if finished else "run"
        count = f"{len(harmful)} field{'s differ' if len(harmful) > 1 else ' differs'}"
        raise WorkdirConfigError(
            f"--workdir={workdir} holds a {what} of another config ({count}: {listed}); {ways}"
        )
    if finished:
        try:
            results = json.loads(fileio.read_text(results_path))
        except (OSError, json.JSONDecodeError) as error:
            raise WorkdirConfigError(
                f"{results_path} is unreadable ({error}); use --overwrite to train again"
            ) from None
        logging.info("%s exists: this configuration is finished", results_path)
        return Decision(workdir, FINISHED, diffs, recorded=recorded, results=results)
    return Decision(workdir, RESUME, diffs, forced=bool(harmful), recorded=recorded)


def prepare(config: Any, workdir: str, **options) -> Decision:
    """`check`, then carry out --overwrite: the old run's files are removed (process 0)."""
    decision = check(config, workdir, **options)
    if decision.differences:
        logging.warning(
            "%s: proceeding with %s fields that differ from its %s: %s",
            decision.workdir,
            "forced" if decision.forced else "harmless",
            CONFIG_FILE,
            ", ".join(str(d) for d in decision.differences),
        )
    if options.get("overwrite") and os.path.isdir(decision.workdir):
        if jax.process_index() == 0:
            removed = clear(decision.workdir)
            if removed:
                logging.warning("--overwrite: removed %s from %s", removed, decision.workdir)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("cxrjax-workdir-overwrite")
    return decision


def clear(workdir: str) -> list[str]:
    """Removes the files a run writes (`RUN_FILES`) from `workdir`; returns their names."""
    removed = []
    for pattern in RUN_FILES:
        for path in sorted(glob.glob(os.path.join(glob.escape(workdir), pattern))):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(os.path.basename(path))
    return removed
