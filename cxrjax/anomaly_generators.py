"""Trained generator runs for anomaly scoring: restore a PGGAN or DDPM workdir (EMA weights).

Split from `cxrjax.anomaly`, which re-exports every name here (`anomaly.load_generator_run`,
`anomaly.GeneratorRun`, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from cxrjax import config as config_lib
from cxrjax import parallel, synthesis
from cxrjax.data import sources
from cxrjax.train import diffusion as diffusion_train
from cxrjax.train import gan, gan_run, optim


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


def run_kind(run_config) -> str:
    """ "pggan" or "ddpm" from a generator run's config.json (its sections tell them apart)."""
    if "schedule" in run_config and run_config.model.name in gan.MODELS:
        return "pggan"
    if "diffusion" in run_config and run_config.model.name in diffusion_train.MODELS:
        return "ddpm"
    return "unknown"


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """A run's resolved config.json (FileNotFoundError, naming the path, when absent)."""
    return synthesis._run_config(os.path.abspath(os.path.expanduser(workdir)))


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
    resolution = int(config.data.resolution)
    rng = jax.random.PRNGKey(int(config.seed))
    if kind == "pggan":
        spec = synthesis._dataset_spec(config.data, config.data.source_resolution)
        generator, discriminator = gan.make_models(config.model, spec.num_classes, resolution)
        tx = gan.make_optimizer(config.optim)
        init_fn = functools.partial(gan_run.init_state_fn, generator, discriminator, tx, tx)
        state, step = synthesis._restore_latest(workdir, jax.eval_shape(init_fn, rng))
        modules = {"generator": generator, "discriminator": discriminator}
        params = {"generator": state.g_ema_params, "discriminator": state.d_params}
    else:
        spec = synthesis._dataset_spec(config.data, config.data.resolution)
        model = diffusion_train.make_model(config.model, spec.num_classes)
        tx, _ = optim.make_optimizer(config.optim, int(config.train.num_steps))
        shape = (resolution, resolution, 1)
        init_fn = functools.partial(diffusion_train.init_state, model, tx, image_shape=shape)
        state, step = synthesis._restore_latest(workdir, jax.eval_shape(init_fn, rng))
        modules, params = {"model": model}, {"model": state.ema_params}
    return GeneratorRun(kind, workdir, config, spec, step, resolution, modules, params)


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
