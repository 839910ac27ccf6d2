"""Metric logging: JSON lines + TensorBoard events from process 0, and console progress.

`metrics.jsonl` stays one row per step across resumes: a writer opened with `resume_step=S`
first drops the rows after S (work a killed process did after its last checkpoint, which the
resumed run replays) and any torn last line, rewriting the file atomically. Non-finite values
are written as `null`, so the file is strict JSON; `read_history` reads it back deduplicated.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

from absl import logging

from cxrjax import fileio


def _scalar(value: Any) -> float | int | None:
    try:
        value = value.item() if hasattr(value, "item") else value
    except (ValueError, TypeError):
        return None
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float):
        return value
    return None


class MetricWriter:
    """Writes `workdir/metrics.jsonl` and TensorBoard event files (process 0 only).

    Other processes get a writer that does nothing, so call sites need no `if` on the
    process index.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(path):
            truncate_after(path, resume_step)
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter  # Event files without TensorFlow.

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: v for k, v in ((k, _scalar(v)) for k, v in scalars.items()) if v is not None}
        self._jsonl.write(fileio.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in clean.items():
                if isinstance(value, float) and not math.isfinite(value):
                    continue
                self._tb.add_scalar(key, value, int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def truncate_after(path: str, step: int) -> None:
    """Keeps the rows of steps <= `step` (and no torn line); atomic rewrite, only if needed."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    rows = fileio.read_jsonl(path)
    keep = [row for row in rows if int(row.get("step", 0) or 0) <= step]
    if (
        len(keep) == len(rows)
        and (not text or text.endswith("\n"))
        and len(rows) == sum(1 for line in text.split("\n") if line.strip())
    ):
        return
    if len(keep) < len(rows):
        logging.info(
            "%s: dropping %d rows after step %d (replayed)", path, len(rows) - len(keep), step
        )
    fileio.write_text(path, "".join(fileio.dumps(row) + "\n" for row in keep))


def read_history(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every logged row of a run, all sessions, one per step (`metrics.jsonl`)."""
    return fileio.by_step(fileio.read_jsonl(os.path.join(workdir, "metrics.jsonl")))


class Progress:
    """Console progress for long work: step, images/s and ETA from the recent rate."""

    def __init__(
        self, total_steps: int, start_step: int, images_per_step: int, *, label: str = "train"
    ):
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self.label = label
        self._last_step = start_step
        self._last_time = time.perf_counter()

    def exclude_elapsed(self) -> None:
        """Leaves the time since the last update (e.g. an evaluation) out of the rate."""
        self._last_time = time.perf_counter()

    def update(self, step: int, scalars: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Logs one progress line; returns the throughput figures for the metric writer."""
        now = time.perf_counter()
        steps = max(step - self._last_step, 0)
        elapsed = max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        steps_per_s = steps / elapsed
        images_per_s = steps_per_s * self.images_per_step
        remaining = max(self.total_steps - step, 0)
        eta = remaining / steps_per_s if steps_per_s > 0 else float("nan")
        shown = " ".join(
            f"{k.split('/')[-1]}={_fmt(v)}"
            for k, v in (scalars or {}).items()
            if _scalar(v) is not None
        )
        logging.info(
            "[%s] step %d/%d (%.0f%%) %s | %.1f img/s | ETA %s",
            self.label,
            step,
            self.total_steps,
            100.0 * step / max(self.total_steps, 1),
            shown,
            images_per_s,
            _fmt_duration(eta),
        )
        return {"perf/images_per_s": images_per_s, "perf/steps_per_s": steps_per_s}


def _fmt(value: Any) -> str:
    value = _scalar(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
