"""One way to open a finished (or running) workdir: `load(workdir) -> Run`.

A workdir holds the resolved `config.json` a run wrote at start, Orbax checkpoints under
`checkpoints/` (or, for an exported generator, `generator.npz`), and its results files.
`load` reads the config, tells the model family from it, builds the abstract state the
family's trainer builds (`jax.eval_shape`, no compile) and restores the best or latest step
onto the host or a mesh. Synthesis, feature extraction, explanations, anomaly scoring,
evaluation and the experiment all open runs through here, so there is one reader to keep
compatible with old workdirs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from cxrjax import checkpoint as checkpoint_lib
from cxrjax import config as config_lib
from cxrjax import fileio, parallel
from cxrjax.data import builders
from cxrjax.models import densenet
from cxrjax.train import classifier, gan, optim
from cxrjax.train import diffusion as diffusion_train

CLASSIFIER, PGGAN, DDPM, ANOMALY = "classifier", "pggan", "ddpm", "anomaly"
FAMILIES = (CLASSIFIER, PGGAN, DDPM, ANOMALY)
# The metric a family's checkpoints are ranked by (None: only the latest step counts).
BEST_METRIC = {CLASSIFIER: "val/auc"}
# An exported generator: the sampling (and scoring) weights of a finished run without its
# optimizer state (see `cxrjax.synthesis.export_generator`).
EXPORT_FILE = "generator.npz"


def read_config(workdir: str, what: str = "run") -> ml_collections.ConfigDict:
    """The resolved config a run wrote at start (workdir/config.json) as a ConfigDict."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir} is not a {what} workdir")
    return ml_collections.ConfigDict(json.loads(fileio.read_text(path)))


def family(config) -> str:
    """The model family a run's config belongs to ("unknown" when none fits)."""
    name = config.get("model", {}).get("name", "") if "model" in config else ""
    if "schedule" in config and name in gan.MODELS:
        return PGGAN
    if "diffusion" in config and name in diffusion_train.MODELS:
        return DDPM
    if "method" in config and "generator_workdir" in config:
        return ANOMALY
    if name in densenet.MODELS:
        return CLASSIFIER
    return "unknown"


def dataset_options(data, resolution: Any = "data") -> dict[str, Any]:
    """Keyword arguments of `builders.prepare/load` for a config's data block.

    `resolution` defaults to data.resolution; pass another (PGGAN: data.source_resolution).
    """
    options = {
        "data_dir": data.data_dir or None,
        "manual_dir": data.manual_dir or None,
        "resolution": data.resolution if resolution == "data" else (resolution or None),
        "skip_corrupt": data.skip_corrupt,
    }
    if data.labels:
        options["labels"] = data.labels
    return options


def dataset_spec(data, resolution: Any = "data"):
    """The DatasetSpec of a config's dataset (prepared idempotently; prepared ones are read)."""
    options = dataset_options(data, resolution)
    return builders.spec(builders.prepare(data.name, **options))


@dataclasses.dataclass
class Parts:
    """What a family's trainer builds before restoring: modules, optimizer, abstract state."""

    modules: dict[str, Any]
    tx: Any
    schedule: Any
    abstract: Any


def build(config, kind: str, spec) -> Parts:
    """The family's modules and abstract state (`jax.eval_shape`: no compile, no memory)."""
    resolution = int(config.data.resolution)
    rng = jax.random.PRNGKey(int(config.seed))
    if kind == CLASSIFIER:
        model = classifier.make_model(config.model, spec.num_classes)
        tx, schedule = optim.make_optimizer(config.optim, int(config.train.num_steps))
        init_fn = functools.partial(
            classifier.init_state,
            model,
            tx,
            image_shape=(resolution, resolution, 1),
            use_ema=config.optim.ema_decay > 0,
        )
        modules = {"model": model}
    elif kind == PGGAN:
        generator, discriminator = gan.make_models(config.model, spec.num_classes, resolution)
        tx, schedule = gan.make_optimizer(config.optim), None
        init_fn = functools.partial(gan.init_state, generator, discriminator, tx, tx)
        modules = {"generator": generator, "discriminator": discriminator}
    elif kind == DDPM:
        model = diffusion_train.make_model(config.model, spec.num_classes)
        tx, schedule = optim.make_optimizer(config.optim, int(config.train.num_steps))
        image_shape = (resolution, resolution, 1)
        init_fn = functools.partial(diffusion_train.init_state, model, tx, image_shape=image_shape)
        modules = {"model": model}
    else:
        raise config_lib.ConfigError(f"no state builder for a {kind!r} run")
    return Parts(modules, tx, schedule, jax.eval_shape(init_fn, rng))


def restore_exported(path: str, abstract) -> tuple[Any, int]:
    """The abstract state with its exported fields filled in (the rest stay abstract)."""
    from flax import traverse_util

    with np.load(path) as saved:
        arrays = {key: saved[key] for key in saved.files}
    step = int(arrays.pop("step"))
    fields = {}
    for field in {key.split("/", 1)[0] for key in arrays}:
        target = traverse_util.flatten_dict(getattr(abstract, field), sep="/")
        flat = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(field + "/")}
        if set(flat) != set(target) or any(flat[k].shape != target[k].shape for k in target):
            raise ValueError(f"{path}: {field} does not fit this config's model")
        fields[field] = traverse_util.unflatten_dict(
            {k: jax.numpy.asarray(v, target[k].dtype) for k, v in flat.items()}, sep="/"
        )
    return abstract.replace(**fields), step


def restore(workdir: str, abstract, **options) -> tuple[Any, int]:
    """(state, step): `restore_with_metadata` without the checkpoint's metadata."""
    state, step, _ = restore_with_metadata(workdir, abstract, **options)
    return state, step


def restore_with_metadata(
    workdir: str,
    abstract,
    *,
    step: int | None = None,
    best_metric: str | None = None,
    mesh=None,
) -> tuple[Any, int, dict[str, Any]]:
    """(state, step, metadata) of a workdir's checkpoint, replicated over `mesh` (default: all
    devices).

    `step` None: the best step by `best_metric` when given and recorded, else the latest. A
    workdir with no checkpoints/ but an exported generator.npz restores the exported fields.
    """
    directory = os.path.join(workdir, "checkpoints")
    exported = os.path.join(workdir, EXPORT_FILE)
    if not os.path.isdir(directory):
        if os.path.exists(exported):
            return (*restore_exported(exported, abstract), {})
        raise FileNotFoundError(f"no checkpoint in {workdir} (looked in {directory})")
    checkpointer = checkpoint_lib.Checkpointer(directory, best_metric=best_metric, async_save=False)
    try:
        if step is None:
            step = (checkpointer.best_step() if best_metric else None) or (
                checkpointer.latest_step()
            )
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {workdir} (looked in {directory})")
        if step not in checkpointer.all_steps():
            raise FileNotFoundError(
                f"no checkpoint {step} in {checkpointer.directory} "
                f"(available: {checkpointer.all_steps()})"
            )
        mesh = mesh or parallel.make_mesh()
        # No abstract state (a family this module has no builder for): the saved tree as is.
        target = (
            None
            if abstract is None
            else checkpoint_lib.abstract_like(abstract, parallel.replicated(mesh))
        )
        state, meta = checkpointer.restore(step, target)
        return state, int(step), meta
    finally:
        checkpointer.close()


@dataclasses.dataclass
class Run:
    """A workdir opened by `load`: its config, family, dataset, restored state and files."""

    workdir: str
    config: ml_collections.ConfigDict
    family: str
    spec: Any = None
    step: int | None = None
    state: Any = None
    parts: Parts | None = None

    @property
    def modules(self) -> dict[str, Any]:
        return self.parts.modules if self.parts else {}

    @property
    def params(self):
        """The weights to use: the EMA copy where the run keeps one, else the trained ones."""
        state = self.state
        fields = state if isinstance(state, dict) else vars(state) if state is not None else {}
        for field in ("ema_params", "g_ema_params", "params"):
            if fields.get(field) is not None:
                return fields[field]
        return None

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def results(self) -> dict[str, Any] | None:
        """The run's results.json (None while the run has not finished)."""
        path = self.path("results.json")
        return json.loads(fileio.read_text(path)) if os.path.exists(path) else None

    def checkpoint_steps(self) -> list[int]:
        directory = self.path("checkpoints")
        if not os.path.isdir(directory):
            return []
        return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def load(
    workdir: str,
    *,
    step: int | None = None,
    select: str = "best",
    state: bool = True,
    mesh=None,
    host: bool = False,
) -> Run:
    """Opens a workdir: config, family, dataset spec and (unless state=False) its state.

    `select` "best" takes the best-by-validation checkpoint where the family ranks them
    (classifiers), "latest" the latest; an explicit `step` wins. `host=True` fetches the
    restored state to host memory (numpy), else it stays replicated over `mesh`. Runs of a
    family this module has no builder for (a new `Job`, an f-AnoGAN encoder) restore their
    saved tree as nested dicts, without modules; with no checkpoints, state stays None.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = read_config(workdir)
    kind = family(config)
    run = Run(workdir, config, kind)
    known = kind in (CLASSIFIER, PGGAN, DDPM)
    if known:
        resolution = config.data.source_resolution if kind == PGGAN else "data"
        run.spec = dataset_spec(config.data, resolution)
    if not state or not (known or run.checkpoint_steps()):
        return run
    # Another family (a new Job, an f-AnoGAN encoder): its saved tree, without modules.
    run.parts = build(config, kind, run.spec) if known else None
    best = BEST_METRIC.get(kind) if select == "best" else None
    abstract = run.parts.abstract if known else None
    run.state, run.step, meta = restore_with_metadata(
        workdir, abstract, step=step, best_metric=best, mesh=mesh
    )
    if not known:
        run.family = meta.get("family", kind)  # `job.train` records its job's name
    if host:
        run.state = jax.device_get(run.state)
    return run
