"""Metric logging: JSON lines + TensorBoard events from process 0, and console progress."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from absl import logging


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
        self, workdir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True
    ):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter  # Event files without TensorFlow.

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: v for k, v in ((k, _scalar(v)) for k, v in scalars.items()) if v is not None}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
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
