"""Trained generator runs for anomaly scoring: restore a PGGAN or DDPM workdir (EMA weights).

Split from `cxrjax.anomaly`, which re-exports every name here (`anomaly.load_generator_run`,
`anomaly.GeneratorRun`, ...).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from cxrjax import config as config_lib
from cxrjax import parallel
from cxrjax.data import sources
from cxrjax.train import gan, runs


@dataclasses.dataclass(frozen=True)
class GeneratorRun:
    """A trained generator restored from its workdir (latest checkpoint, EMA parameters)."""

    kind: str  # "pggan" or "ddpm"
    workdir: str
    config: ml_collections.ConfigDict
    spec: sources.DatasetSpec
    step: int
    resolution: int
    modules: dict[str, Any]  # pggan: generator, discriminator; ddpm: model
    params: dict[str, Any]  # pggan: generator (EMA), discriminator; ddpm: model (EMA)
    # The film's size on the canvas (PGGAN data.content_resolution): inputs are padded to the
    # canvas, never resampled; 0 = the film fills the canvas.
    content_resolution: int = 0


def run_kind(run_config) -> str:
    """ "pggan" or "ddpm" from a generator run's config.json (its sections tell them apart)."""
    found = runs.family(run_config)
    return found if found in (runs.PGGAN, runs.DDPM) else "unknown"


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """A run's resolved config.json (FileNotFoundError, naming the path, when absent)."""
    return runs.read_config(os.path.abspath(os.path.expanduser(workdir)), "generator run")


def load_generator_run(workdir: str, kind: str, mesh=None) -> GeneratorRun:
    """Restores a PGGAN (G EMA + D) or DDPM (EMA) run from its latest checkpoint."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = read_run_config(workdir)
    found = run_kind(config)
    if found != kind:
        raise config_lib.ConfigError(
            f"{workdir} holds a {found} run (config.json), not a {kind} run"
        )
    mesh = mesh or parallel.make_mesh()
    run = runs.load(workdir, select="latest", mesh=mesh)
    state, modules = run.state, run.modules
    if kind == "pggan":
        params = {"generator": state.g_ema_params, "discriminator": state.d_params}
    else:
        params = {"model": state.ema_params}
    resolution = int(config.data.resolution)
    film = gan.film_resolution(config) if kind == "pggan" else resolution
    content = 0 if film == resolution else film
    return GeneratorRun(
        kind, workdir, config, run.spec, run.step, resolution, modules, params, content
    )


def class_label(class_name: str, class_names: Sequence[str], conditional: bool) -> int:
    """The conditioning label of the normal class (0 for an unconditional generator)."""
    if not conditional:
        return 0
    if class_name not in class_names:
        raise config_lib.ConfigError(
            f"normal class {class_name!r} is not a class of the conditional generator "
            f"{list(class_names)}"
        )
    return list(class_names).index(class_name)
