"""Results files and run provenance shared by every trainer (results.json, versions, device)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import jax

from cxrjax import fileio


def save_results(path: str, results: Mapping[str, Any]) -> None:
    """Atomically writes strict JSON: NaN/inf become null (missing), never bare NaN."""
    fileio.write_json(path, results)


def software_versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets")
    versions = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions


def device_description() -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
    }


class Clock:
    """A run's wall time over all its sessions: `before` (restored from the checkpoint this
    session resumed, see loop.run) plus this session's time since the clock was made."""

    def __init__(self, before: float = 0.0):
        self.start = time.perf_counter()
        self.before = float(before)

    def resume(self, meta: Mapping[str, Any]) -> None:
        """Takes the wall time recorded in a restored checkpoint's metadata."""
        self.before = float((meta or {}).get("wall_time_s") or 0.0)

    def total(self) -> float:
        return round(self.before + time.perf_counter() - self.start, 2)


def elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 2)
