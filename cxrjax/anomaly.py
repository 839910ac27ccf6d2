"""One anomaly-detection interface for f-AnoGAN (PGGAN + encoder) and DDPM reconstruction.

  scorer = load_scorer("fanogan", "workdirs/anomaly_fanogan")   # an encoder run's workdir
  scorer = load_scorer("ddpm", "workdirs/ddpm", t_star=200, steps=10)  # a DDPM run's workdir
  scores, maps = scorer(images)          # images [B, R, R, 1] in [-1, 1] -> [B], [B, R, R]
  results = evaluate(scorer, {"val": val_source, "test": test_source}, spec, "normal", out_dir)

Scores grow with abnormality; maps are the per-pixel residual |x - reconstruction| (mean over
channels). A scorer reconstructs every image towards the normal class: a conditional generator
gets the normal label (never the image's true label, which is what is being predicted).

* f-AnoGAN (Schlegl et al. 2019, izi_f): score = mean (x - G(E(x)))^2 + kappa * mean
  (f_D(x) - f_D(G(E(x))))^2, the encoder's training loss per image (`cxrjax.train.anomaly`).
* DDPM (e.g. Wolleb et al. 2022 / Graham et al. 2023-style partial diffusion): noise x to index
  t_star, denoise back with deterministic DDIM, score = mean squared (or absolute) error. The
  forward noise of record i is drawn from fold_in(key(seed), i), so a record's score does not
  depend on its batch.

`evaluate` scores validation and test (normal = `normal_class`, abnormal = every other class),
reports ROC-AUC and PR-AUC (average precision) per split, chooses the decision threshold on
validation only and applies it to test (accuracy, precision, recall, specificity, F1), adds
bootstrap CIs over test images, and writes results.json, results.md, roc.png, residuals.png and
{val,test}_scores.npz. Metrics come from `cxrjax.metrics.classification` (no ROC code here).
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import functools
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from cxrjax import config as config_lib
from cxrjax import diffusion, fileio, parallel, report, synthesis
from cxrjax.data import mixing, pipeline, sources
from cxrjax.metrics import classification as cls_metrics
from cxrjax.models import unet
from cxrjax.train import anomaly as anomaly_train
from cxrjax.train import diffusion as diffusion_train
from cxrjax.train import gan, gan_run, loop, optim
from cxrjax.train import results as results_lib

METHODS = ("fanogan", "ddpm")
METRICS = ("mse", "l1")
NORMAL, ABNORMAL = "normal", "abnormal"
# The binary task's class names: the positive class (label 1, high score) is "abnormal".
TASK_CLASSES = (NORMAL, ABNORMAL)
NO_FINDING = "No Finding"  # builders.common.NO_FINDING: a multi-label record with no finding


# ----------------------------------------------------------------------------- generator runs
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


# ----------------------------------------------------------------------------- scorers
class Scorer(abc.ABC):
    """Base of the anomaly scorers: `outputs` per batch, `__call__` -> (scores, maps).

    Subclasses set `method`, `resolution` (input size), `info` (JSON-able description) and
    implement `outputs(images, labels=None, indices=None)` -> {"score": [B], "map": [B, H, W],
    "reconstruction": [B, H, W, C] (optional), "terms/<name>": [B] (optional components)},
    as jax arrays (sharded like `images`) or numpy. `labels` are conditioning labels (default:
    the normal class); `indices` are record ids that key per-image randomness (default 0..B-1).
    """

    method: str = ""
    resolution: int = 0
    info: dict[str, Any] = {}

    @abc.abstractmethod
    def outputs(self, images, labels=None, indices=None) -> dict[str, Any]:
        """The per-batch outputs described in the class docstring."""

    def __call__(self, images, labels=None, *, indices=None) -> tuple[np.ndarray, np.ndarray]:
        out = parallel.to_host(self.outputs(images, labels, indices))
        return np.asarray(out["score"], np.float32), np.asarray(out["map"], np.float32)


def _residual_map(images, recon):
    return jnp.mean(jnp.abs(images.astype(jnp.float32) - recon.astype(jnp.float32)), axis=-1)


class FAnoGANScorer(Scorer):
    """izi_f score from an encoder and a PGGAN run (frozen EMA G and D, final resolution)."""

    method = "fanogan"

    def __init__(
        self,
        run: GeneratorRun,
        encoder,
        encoder_params,
        *,
        normal_class: str,
        kappa: float = 1.0,
        mesh=None,
        extra_info: Mapping[str, Any] | None = None,
    ):
        mesh = mesh or parallel.make_mesh()
        generator, discriminator = run.modules["generator"], run.modules["discriminator"]
        self.resolution = run.resolution
        self.normal_label = class_label(
            normal_class, run.spec.class_names, generator.num_classes > 0
        )
        self.kappa = float(kappa)
        self._params = parallel.replicate(
            {
                "encoder": encoder_params,
                "generator": run.params["generator"],
                "discriminator": run.params["discriminator"],
            },
            mesh,
        )
        self.info = {
            "method": self.method,
            "generator_workdir": run.workdir,
            "generator_step": run.step,
            "resolution": run.resolution,
            "kappa": self.kappa,
            "normal_class": normal_class,
            "conditional": generator.num_classes > 0,
            "score": "mean (x - G(E(x)))^2 + kappa * mean (f_D(x) - f_D(G(E(x))))^2",
            **dict(extra_info or {}),
        }
        resolution, kappa, normal_label = self.resolution, self.kappa, self.normal_label

        def outputs(params, images, labels):
            images = images.astype(jnp.float32)
            if labels is None:
                labels = anomaly_train.normal_labels(generator, images.shape[0], normal_label)
            terms = anomaly_train.izif_terms(
                encoder,
                generator,
                discriminator,
                params["encoder"],
                params["generator"],
                params["discriminator"],
                images,
                resolution=resolution,
                labels=labels,
            )
            recon = terms["reconstruction"]
            return {
                "score": terms["residual"] + kappa * terms["feature"],
                "map": _residual_map(images, recon),
                "reconstruction": recon,
                "terms/residual": terms["residual"],
                "terms/feature": terms["feature"],
            }

        self._outputs = jax.jit(outputs)

    def outputs(self, images, labels=None, indices=None) -> dict[str, Any]:
        del indices  # deterministic: no per-image randomness
        return self._outputs(self._params, images, labels)


class DDPMScorer(Scorer):
    """Partial-diffusion reconstruction error from a DDPM run (EMA parameters)."""

    method = "ddpm"

    def __init__(
        self,
        run: GeneratorRun,
        *,
        normal_class: str,
        t_star: int = 200,
        steps: int = 10,
        metric: str = "mse",
        eta: float = 0.0,
        guidance: float = 0.0,
        seed: int = 0,
        mesh=None,
    ):
        model = run.modules["model"]
        num_timesteps = int(run.config.diffusion.num_timesteps)
        if not 1 <= int(t_star) < num_timesteps:
            raise config_lib.ConfigError(
                f"ddpm.t_star must be in [1, {num_timesteps - 1}] (the run's T = "
                f"{num_timesteps}), got {t_star}"
            )
        if not 1 <= int(steps) <= int(t_star) + 1:
            raise config_lib.ConfigError(
                f"ddpm.steps must be in [1, t_star + 1 = {int(t_star) + 1}], got {steps}"
            )
        if metric not in METRICS:
            raise config_lib.ConfigError(f"ddpm.metric must be one of {METRICS}, got {metric!r}")
        mesh = mesh or parallel.make_mesh()
        conditional = model.num_classes > 0
        self.resolution = run.resolution
        self.normal_label = class_label(normal_class, run.spec.class_names, conditional)
        self._params = parallel.replicate(run.params["model"], mesh)
        self._key = parallel.replicate(np.asarray(jax.random.PRNGKey(int(seed))), mesh)
        self.info = {
            "method": self.method,
            "generator_workdir": run.workdir,
            "generator_step": run.step,
            "resolution": run.resolution,
            "t_star": int(t_star),
            "num_timesteps": num_timesteps,
            "steps": int(steps),
            "sampler": "ddim",
            "eta": float(eta),
            "guidance": float(guidance),
            "metric": metric,
            "seed": int(seed),
            "normal_class": normal_class,
            "conditional": conditional,
            "score": f"{metric} between x and DDIM(q(x_t*, x)) from t* = {int(t_star)}",
        }
        schedule = diffusion_train.make_noise_schedule(run.config.diffusion)
        prediction = run.config.diffusion.prediction
        normal_label = self.normal_label
        use_guidance = conditional and guidance > 0

        def outputs(params, key, images, labels, indices):
            images = images.astype(jnp.float32)
            batch = images.shape[0]
            if labels is None:
                labels = jnp.full((batch,), normal_label, jnp.int32)
            if indices is None:
                indices = jnp.arange(batch, dtype=jnp.int32)
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices.astype(jnp.int32))
            model_fn = unet.make_model_fn(model, params)

            def one(image, image_key, label):  # one image at a time: its noise is its own
                recon = diffusion.reconstruct(
                    model_fn,
                    schedule,
                    image[None],
                    int(t_star),
                    image_key,
                    sampler="ddim",
                    steps=int(steps),
                    labels=label[None].astype(jnp.int32) if conditional else None,
                    eta=float(eta),
                    prediction=prediction,
                    guidance_scale=float(guidance) if use_guidance else None,
                    null_id=model.null_id if use_guidance else None,
                )
                return recon[0]

            recon = jax.vmap(one)(images, keys, labels)
            return {
                "score": diffusion.reconstruction_error(images, recon, metric),
                "map": _residual_map(images, recon),
                "reconstruction": recon,
            }

        self._outputs = jax.jit(outputs)

    def outputs(self, images, labels=None, indices=None) -> dict[str, Any]:
        return self._outputs(self._params, self._key, images, labels, indices)


def load_scorer(method: str, workdir: str, *, mesh=None, **options) -> Scorer:
    """The scorer of `method` from a workdir.

    "fanogan": `workdir` is an anomaly run (launch.train_anomaly) holding the trained encoder;
    its config names the PGGAN run. Options: normal_class, kappa (default: the run's).
    "ddpm": `workdir` is a DDPM run (launch.train_ddpm). Options: normal_class ("normal"),
    t_star (200), steps (10), metric ("mse" | "l1"), eta (0), guidance (0), seed (0).
    """
    if method not in METHODS:
        raise config_lib.ConfigError(f"method must be one of {METHODS}, got {method!r}")
    mesh = mesh or parallel.make_mesh()
    if method == "ddpm":
        known = {"normal_class", "t_star", "steps", "metric", "eta", "guidance", "seed"}
        _check_options(options, known)
        options.setdefault("normal_class", NORMAL)
        return DDPMScorer(load_generator_run(workdir, "ddpm", mesh), mesh=mesh, **options)
    _check_options(options, {"normal_class", "kappa"})
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = read_run_config(workdir)
    if config.get("method") != "fanogan" or "encoder" not in config:
        raise config_lib.ConfigError(
            f"{workdir} is not an f-AnoGAN encoder run: load_scorer('fanogan', ...) takes the "
            "workdir of launch.train_anomaly (whose config names the PGGAN run)"
        )
    run = load_generator_run(config.generator_workdir, "pggan", mesh)
    encoder = anomaly_train.make_encoder(config.encoder, run.modules["generator"].latent_dim)
    tx, _ = optim.make_optimizer(config.optim, int(config.train.num_steps))
    shape = (run.resolution, run.resolution, 1)
    init_fn = functools.partial(anomaly_train.init_state, encoder, tx, image_shape=shape)
    state, step = synthesis._restore_latest(
        workdir, jax.eval_shape(init_fn, jax.random.PRNGKey(int(config.seed)))
    )
    return FAnoGANScorer(
        run,
        encoder,
        state.params,
        normal_class=options.get("normal_class", config.data.normal_class),
        kappa=options.get("kappa", config.fanogan.kappa),
        mesh=mesh,
        extra_info={"encoder_workdir": workdir, "encoder_step": step},
    )


def _check_options(options: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown scorer options {unknown}; known: {sorted(known)}")


# ----------------------------------------------------------------------------- evaluation
def check_normal_class(spec: sources.DatasetSpec, normal_class: str) -> None:
    """ConfigError unless `normal_class` names a class of the dataset (multi-label datasets
    also accept "No Finding": the records without any finding)."""
    ok = normal_class in spec.class_names or (
        spec.label_kind == sources.MULTILABEL and normal_class == NO_FINDING
    )
    if not ok:
        raise config_lib.ConfigError(
            f"config.data.normal_class: {normal_class!r} is not a class of {spec.name} "
            f"{list(spec.class_names)}"
        )


def anomaly_labels(labels: np.ndarray, class_names: Sequence[str], normal_class: str):
    """0 for records of `normal_class`, 1 for every other record (int64 [N])."""
    labels = np.asarray(labels)
    normal = np.zeros(len(labels), bool)
    normal[mixing.class_indices(labels, normal_class, class_names)] = True
    return (~normal).astype(np.int64)


def score_split(
    scorer: Scorer, source, spec, *, batch_size: int, mesh=None, num_workers=0, name="split"
):
    """Scores every record of `source` once: host arrays in record order.

    Returns {"score": [N], "label": the dataset labels, "index": [N], "terms/...": [N]}. Works
    across processes like the classifier's predictions: each process feeds its shard, the
    gathered batches are unpadded by `mask` and sorted by record index. Logs progress (images,
    images/s, ETA) about every 10 % of the batches.
    """
    mesh = mesh or parallel.make_mesh()
    total = len(mixing.as_mixed(source))
    num_batches = pipeline.eval_num_batches(total, batch_size, jax.process_count())
    log_every = max(1, num_batches // 10)
    start, done = time.perf_counter(), 0
    batches = pipeline.make_eval_dataset(
        source,
        spec,
        global_batch_size=batch_size,
        resolution=scorer.resolution,
        normalization="generator",
        num_workers=num_workers,
    )
    chunks: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for batch in batches:
        arrays = loop.device_batch(batch, mesh)
        out = scorer.outputs(arrays["image"], indices=arrays["index"])
        wanted = {k: v for k, v in out.items() if k == "score" or k.startswith("terms/")}
        host = parallel.to_host(
            {**wanted, "label": arrays["label"], "mask": arrays["mask"], "index": arrays["index"]}
        )
        keep = np.asarray(host.pop("mask"), bool)
        for key, value in host.items():
            chunks[key].append(np.asarray(value)[keep])
        done += 1
        if done % log_every == 0 or done == num_batches:
            seen = sum(len(c) for c in chunks["score"])
            rate = seen / max(time.perf_counter() - start, 1e-9)
            logging.info(
                "[score] %s %s: %d/%d images, %.1f img/s, ETA %.0f s",
                scorer.method,
                name,
                seen,
                total,
                rate,
                (total - seen) / max(rate, 1e-9),
            )
    out = {key: np.concatenate(values) for key, values in chunks.items()}
    order = np.argsort(out["index"], kind="stable")
    return {key: value[order] for key, value in out.items()}


def _example_indices(y: np.ndarray, index: np.ndarray, k: int) -> np.ndarray:
    """The first k normal and first k abnormal records (in record order)."""
    normal, abnormal = index[y == 0][:k], index[y == 1][:k]
    return np.concatenate([normal, abnormal]).astype(np.int64)


def save_residual_figure(
    scorer: Scorer, source, spec, record_indices, captions, path: str, *, batch_size, mesh=None
) -> str | None:
    """PNG: columns = the given records; rows = input / reconstruction / |residual|.

    Residuals share one grey scale (0 .. the largest shown value), so columns compare.
    Returns the path, or None when there is nothing to show.
    """
    if len(record_indices) == 0:
        return None
    mesh = mesh or parallel.make_mesh()
    part = mixing.Part(source, name="examples", indices=np.sort(np.asarray(record_indices)))
    batches = pipeline.make_eval_dataset(
        part, spec, global_batch_size=batch_size, resolution=scorer.resolution
    )
    rows: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for batch in batches:
        arrays = loop.device_batch(batch, mesh)
        out = scorer.outputs(arrays["image"], indices=arrays["index"])
        wanted = {k: out[k] for k in ("map", "reconstruction") if k in out}
        host = parallel.to_host(
            {**wanted, "image": arrays["image"], "mask": arrays["mask"], "index": arrays["index"]}
        )
        keep = np.asarray(host.pop("mask"), bool)
        for key, value in host.items():
            rows[key].append(np.asarray(value)[keep])
    got = {key: np.concatenate(values) for key, values in rows.items()}
    # Back to the caller's column order.
    position = {int(i): k for k, i in enumerate(got["index"])}
    order = np.asarray([position[int(i)] for i in record_indices])
    to_uint8 = lambda x: np.clip(np.round((x[..., 0] + 1.0) * 127.5), 0, 255).astype(np.uint8)
    tiles, labels = [to_uint8(got["image"][order])], list(captions)
    if "reconstruction" in got:
        tiles.append(to_uint8(got["reconstruction"][order]))
        labels += ["reconstruction"] * len(order)
    maps = got["map"][order]
    vmax = max(float(maps.max()), 1e-6)
    tiles.append(np.round(np.clip(maps / vmax, 0, 1) * 255).astype(np.uint8))
    labels += [f"|residual| (max {vmax:.2f})"] * len(order)
    if not parallel.is_main_process():
        return None
    report.save_image_grid(np.concatenate(tiles), path, nrow=len(order), labels=labels)
    return path


def evaluate(
    scorer: Scorer,
    splits: Mapping[str, Any],
    spec: sources.DatasetSpec,
    normal_class: str,
    output_dir: str,
    *,
    batch_size: int = 64,
    threshold: str = "youden",
    n_bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    num_examples: int = 4,
    num_workers: int = 0,
    mesh=None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Normal-vs-abnormal evaluation on splits["val"] and splits["test"]; writes output_dir/.

    The threshold is `select_threshold(val labels, val scores, threshold)`: test scores never
    reach it. Test metrics come with `level` bootstrap CIs over test images (`n_bootstrap`
    resamples, stratified); validation metrics are point values. Files (process 0):
    results.json, results.md, roc.png, residuals.png, {val,test}_scores.npz (score, terms,
    dataset label, y = 1 for abnormal, record index).
    """
    if threshold not in ("youden", "f1"):
        raise config_lib.ConfigError(f"threshold must be 'youden' or 'f1', got {threshold!r}")
    check_normal_class(spec, normal_class)
    mesh = mesh or parallel.make_mesh()
    parallel.check_global_batch(batch_size, mesh, "eval batch")
    scored = {}
    for split in ("val", "test"):
        out = score_split(
            scorer,
            splits[split],
            spec,
            batch_size=batch_size,
            mesh=mesh,
            num_workers=num_workers,
            name=split,
        )
        out["y"] = anomaly_labels(out["label"], spec.class_names, normal_class)
        if out["y"].min() == out["y"].max():
            raise config_lib.ConfigError(
                f"the {split} split holds only {'abnormal' if out['y'][0] else 'normal'} "
                "images: ROC-AUC and the threshold need both"
            )
        scored[split] = out
    val, test = scored["val"], scored["test"]
    chosen = cls_metrics.select_threshold(val["y"], val["score"], threshold)  # validation only
    common = dict(threshold=chosen, class_names=TASK_CLASSES, seed=seed, level=level)
    val_result = cls_metrics.evaluate(val["y"], val["score"], n_bootstrap=0, **common)
    test_result = cls_metrics.evaluate(test["y"], test["score"], n_bootstrap=n_bootstrap, **common)
    terms = {}
    for key in sorted(k for k in test if k.startswith("terms/")):
        terms[key.removeprefix("terms/")] = {
            split: {
                m: cls_metrics.evaluate(
                    scored[split]["y"], scored[split][key], n_bootstrap=0, class_names=TASK_CLASSES
                )[m]
                for m in ("auc", "pr_auc")
            }
            for split in ("val", "test")
        }
    abnormal = [c for c in spec.class_names if c != normal_class]
    results: dict[str, Any] = {
        "finished": True,
        "method": scorer.method,
        "scorer": dict(scorer.info),
        "dataset": {
            "name": spec.name,
            "class_names": list(spec.class_names),
            "normal_class": normal_class,
            "abnormal_classes": abnormal,
            **{
                f"{split}_counts": {
                    NORMAL: int((s["y"] == 0).sum()),
                    ABNORMAL: int((s["y"] == 1).sum()),
                }
                for split, s in scored.items()
            },
        },
        "threshold": chosen,
        "threshold_method": threshold,
        "threshold_split": "val",
        "val": val_result,
        "test": test_result,
        "terms": terms,
        "seed": int(seed),
        "software": results_lib.software_versions(),
        "device": results_lib.device_description(),
        **dict(extra or {}),
    }
    k = int(num_examples)
    examples = _example_indices(test["y"], test["index"], k) if k else np.zeros((0,), np.int64)
    score_of = dict(zip(test["index"].tolist(), test["score"].tolist(), strict=True))
    name_of = {
        int(i): (spec.class_names[int(c)] if np.ndim(c) == 0 else (ABNORMAL if y else NORMAL))
        for i, c, y in zip(test["index"], test["label"], test["y"], strict=True)
    }
    captions = [f"{name_of[int(i)]} {score_of[int(i)]:.3g}" for i in examples]
    os.makedirs(output_dir, exist_ok=True)
    residuals = save_residual_figure(
        scorer,
        splits["test"],
        spec,
        examples,
        captions,
        os.path.join(output_dir, "residuals.png"),
        batch_size=batch_size,
        mesh=mesh,
    )
    results["examples"] = {"test_indices": examples.tolist(), "figure": residuals}
    if parallel.is_main_process():
        for split, out in scored.items():
            fileio.save_npz(
                os.path.join(output_dir, f"{split}_scores.npz"),
                **{k.replace("/", "_"): v for k, v in out.items()},
            )
        curves = {"val": (val["y"], val["score"]), "test": (test["y"], test["score"])}
        report.save_roc_curves(
            curves, os.path.join(output_dir, "roc.png"), title=f"ROC ({scorer.method})"
        )
        write_markdown(os.path.join(output_dir, "results.md"), results)
        results_lib.save_results(os.path.join(output_dir, "results.json"), results)
    return results


def write_markdown(path: str, results: Mapping[str, Any]) -> None:
    keys = ("auc", "pr_auc", "accuracy", "precision", "recall", "specificity", "f1")
    rows = []
    for split in ("val", "test"):
        result = results[split]
        row = {"split": f"{split} ({result['n']}, {result['n_positive']} abnormal)"}
        for key in keys:
            row[key] = report.format_value(result.get(key), ci=result.get(f"{key}_ci"))
        rows.append(row)
    data, scorer = results["dataset"], results["scorer"]
    boot = results["test"].get("bootstrap", {})
    lines = [
        f"# Anomaly detection ({results['method']}): {data['name']}",
        "",
        f"Normal: `{data['normal_class']}`; abnormal: {', '.join(data['abnormal_classes'])}. "
        f"Score: {scorer.get('score')}. Generator: {scorer.get('generator_workdir')} "
        f"(step {scorer.get('generator_step')}).",
        "",
        f"Threshold ({results['threshold_method']}) chosen on validation = "
        f"{results['threshold']:.6g}, applied unchanged to test. Test brackets: "
        f"{boot.get('level', 0.95):.0%} bootstrap CIs ({boot.get('n_resamples', 0)} resamples "
        "of test images).",
        "",
        report.markdown_table(
            rows,
            {
                "split": "split",
                "auc": "ROC-AUC",
                "pr_auc": "PR-AUC",
                "accuracy": "accuracy",
                "precision": "precision",
                "recall": "recall",
                "specificity": "specificity",
                "f1": "F1",
            },
        ),
    ]
    if results.get("terms"):
        lines += ["Each score term alone (ROC-AUC val / test):", ""]
        for name, value in results["terms"].items():
            lines.append(
                f"- {name}: {report.format_value(value['val']['auc'])} / "
                f"{report.format_value(value['test']['auc'])}"
            )
        lines.append("")
    directory = os.path.dirname(path)
    for title, name in (("ROC", "roc.png"), ("Residuals", "residuals.png")):
        if os.path.exists(os.path.join(directory, name)):
            lines.append(f"![{title}]({name})")
    if os.path.exists(os.path.join(directory, "residuals.png")):
        lines += [
            "",
            "residuals.png: columns are the first normal then the first abnormal test images "
            "(caption: class and score); rows are input, reconstruction and |residual|.",
        ]
    fileio.write_text(path, "\n".join(lines) + "\n")


def load_results(output_dir: str) -> dict[str, Any] | None:
    path = os.path.join(output_dir, "results.json")
    return json.loads(fileio.read_text(path)) if os.path.exists(path) else None
