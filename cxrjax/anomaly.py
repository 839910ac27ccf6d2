"""One anomaly-detection interface for f-AnoGAN (PGGAN + encoder) and DDPM reconstruction.

  scorer = load_scorer("fanogan", "workdirs/anomaly_fanogan")   # an encoder run's workdir
  scorer = load_scorer("ddpm", "workdirs/ddpm", t_star=200, steps=10)  # a DDPM run's workdir
  scores, maps = scorer(images)          # images [B, R, R, 1] in [-1, 1] -> [B], [B, R, R]
  results = evaluate(scorer, {"val": val_source, "test": test_source}, spec, "normal", out_dir)

Direction, fixed in advance for every score: higher = more anomalous; a score is never flipped
after looking at data (below chance on validation -> a warning in results, nothing else). Maps
are the per-pixel residual |x - reconstruction| (mean over channels). A scorer reconstructs
towards the normal class: a conditional generator gets the normal label (never the true one).

* f-AnoGAN (Schlegl et al. 2019, izi_f): score = mean (x - G(E(x)))^2 + kappa * mean
  (f_D(x) - f_D(G(E(x))))^2, the encoder's training loss per image (`cxrjax.train.anomaly`).
* DDPM (e.g. Wolleb et al. 2022 / Graham et al. 2023-style partial diffusion): noise x to index
  t_star, denoise back with deterministic DDIM, score = mean squared (or absolute) error. The
  forward noise of record i is drawn from fold_in(key(seed), i), so a record's score does not
  depend on its batch. `select_on_validation` picks t* from a grid by validation ROC-AUC.
* Feature space (`with_features(scorer, "cxr:<classifier workdir>")`, either method): score =
  ||phi(x) - phi(x_hat)||^2 / D, phi = pooled penultimate classifier features (D-dim), x_hat
  the method's reconstruction; the pixel-space score is kept beside it ("score/pixels").

`evaluate` scores validation and test (normal = `normal_class`, abnormal = every other class),
reports ROC-AUC and PR-AUC (average precision) per split and score space, chooses the decision
threshold on validation only and applies it to test (accuracy, precision, recall, specificity,
F1), adds bootstrap CIs over test images, and writes results.json, results.md, roc.png,
residuals.png and {val,test}_scores.npz (`cxrjax.anomaly_report`). Metrics come from
`cxrjax.metrics.classification` (no ROC code here).
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
import numpy as np
from absl import logging

from cxrjax import anomaly_generators, anomaly_report, diffusion, fileio, parallel
from cxrjax import config as config_lib
from cxrjax.data import imageio, mixing, pipeline, sources
from cxrjax.metrics import classification as cls_metrics
from cxrjax.models import unet
from cxrjax.train import anomaly as anomaly_train
from cxrjax.train import diffusion as diffusion_train
from cxrjax.train import loop, optim, runs
from cxrjax.train import results as results_lib

METHODS = ("fanogan", "ddpm")
METRICS = ("mse", "l1")
SPACES = ("pixels", "features")  # where reconstruction error is measured
NORMAL, ABNORMAL = "normal", "abnormal"
# The binary task's class names: the positive class (label 1, high score) is "abnormal".
TASK_CLASSES = (NORMAL, ABNORMAL)
NO_FINDING = "No Finding"  # builders.common.NO_FINDING: a multi-label record with no finding


# Generator runs live in cxrjax.anomaly_generators; these names stay importable from here.
GeneratorRun = anomaly_generators.GeneratorRun
run_kind = anomaly_generators.run_kind
read_run_config = anomaly_generators.read_run_config
load_generator_run = anomaly_generators.load_generator_run
class_label = anomaly_generators.class_label


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
    content_resolution: int = 0  # > 0: films padded to `resolution` (GeneratorRun's field)
    info: dict[str, Any] = {}
    spaces: tuple[str, ...] = ("pixels",)  # the score spaces `outputs` gives ("score/<space>")
    primary: str = "pixels"  # the space whose score is "score"

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
        self.resolution, self.content_resolution = run.resolution, run.content_resolution
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
            "content_resolution": run.content_resolution,
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

        self._outputs = jax.jit(outputs, compiler_options=parallel.cpu_compiler_options())

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
        self._schedule = parallel.replicate(schedule, mesh)
        timesteps = diffusion.ddim_timesteps(int(t_star), int(steps))
        self._timesteps = parallel.replicate(timesteps, mesh)
        self._outputs = _ddpm_outputs_fn(
            model,
            prediction=run.config.diffusion.prediction,
            metric=metric,
            eta=float(eta),
            guidance=float(guidance) if conditional and guidance > 0 else None,
            normal_label=self.normal_label,
        )

    def outputs(self, images, labels=None, indices=None) -> dict[str, Any]:
        return self._outputs(
            self._params, self._schedule, self._timesteps, self._key, images, labels, indices
        )


@functools.lru_cache(maxsize=8)  # one compiled scorer per model and settings, shared over t*
def _ddpm_outputs_fn(model, *, prediction, metric, eta, guidance, normal_label):
    """(params, schedule, timesteps, key, images, labels, indices) -> DDPMScorer outputs, jitted.

    t* and the DDIM steps arrive as the traced `timesteps` array, so selecting t* on validation
    compiles once per step count rather than once per grid value.
    """
    conditional = model.num_classes > 0

    def outputs(params, schedule, timesteps, key, images, labels, indices):
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
                timesteps[0],
                image_key,
                sampler="ddim",
                timesteps=timesteps,
                labels=label[None].astype(jnp.int32) if conditional else None,
                eta=eta,
                prediction=prediction,
                guidance_scale=guidance,
                null_id=model.null_id if guidance is not None else None,
            )
            return recon[0]

        recon = jax.vmap(one)(images, keys, labels)
        return {
            "score": diffusion.reconstruction_error(images, recon, metric),
            "map": _residual_map(images, recon),
            "reconstruction": recon,
        }

    return jax.jit(outputs, compiler_options=parallel.cpu_compiler_options())


FEATURE_SCORE = "||phi(x) - phi(x_hat)||^2 / D, phi = the extractor's features, D their dimension"


@functools.lru_cache(maxsize=8)  # one compiled function per extractor, shared by scorers
def feature_distance_fn(apply_fn, input_size: int | None):
    """(params, images, reconstructions) -> ||phi(x) - phi(x_hat)||^2 / D per image, float32 [B].

    images and reconstructions: [B, H, W, 1] in [-1, 1]; both map to [0, 1] (clipped), are
    resized in-graph to `input_size` (antialiased cubic, when it differs) and go through
    `apply_fn` in one batch, so x and x_hat see exactly the same preprocessing.
    """

    def distance(params, images, recon):
        both = jnp.concatenate([images, recon]).astype(jnp.float32)  # [2B, H, W, 1]
        both = jnp.clip((both + 1.0) * 0.5, 0.0, 1.0)
        b, h, w, c = both.shape
        if input_size and (h, w) != (input_size, input_size):
            size = (b, int(input_size), int(input_size), c)
            both = jnp.clip(jax.image.resize(both, size, "cubic", antialias=True), 0.0, 1.0)
        phi_x, phi_recon = jnp.split(apply_fn(params, both).astype(jnp.float32), 2)
        return jnp.mean(jnp.square(phi_x - phi_recon), axis=-1)  # mean over D: / D

    return jax.jit(distance, compiler_options=parallel.cpu_compiler_options())


class FeatureSpaceScorer(Scorer):
    """A scorer plus the reconstruction error in a feature extractor's space (`features.py`).

    Outputs the base scorer's outputs, "score/pixels" (the base's own score), "score/features"
    (FEATURE_SCORE, from `feature_distance_fn` on the base's reconstruction) and "score" = the
    `primary` one. Both spaces grow with abnormality by construction.
    """

    def __init__(self, base: Scorer, extractor, *, primary: str = "features", mesh=None):
        if primary not in SPACES:
            raise config_lib.ConfigError(f"primary score must be one of {SPACES}, got {primary!r}")
        mesh = mesh or parallel.make_mesh()
        self.base, self.extractor = base, extractor
        self.method, self.resolution = base.method, base.resolution
        self.content_resolution = base.content_resolution
        self.spaces, self.primary = SPACES, primary
        self._params = parallel.replicate(extractor.params, mesh)
        self._distance = feature_distance_fn(extractor.apply_fn, extractor.input_size)
        self.info = {
            **base.info,
            "features": extractor.describe(),
            "feature_score": FEATURE_SCORE,
            "primary_score": primary,
        }

    def outputs(self, images, labels=None, indices=None) -> dict[str, Any]:
        out = dict(self.base.outputs(images, labels, indices))
        if "reconstruction" not in out:
            raise ValueError(f"{self.method} scorer gives no reconstruction to compare features")
        out["score/pixels"] = out["score"]
        films, recon = images, out["reconstruction"]
        if self.content_resolution:  # the judge sees the film, not the padded canvas
            content = self.content_resolution
            films, recon = (imageio.crop_content(x, content, axes=(1, 2)) for x in (films, recon))
        out["score/features"] = self._distance(self._params, films, recon)
        out["score"] = out[f"score/{self.primary}"]
        return out


def with_features(scorer: Scorer, spec, *, primary: str = "", mesh=None) -> Scorer:
    """`scorer` itself when `spec` is "", else a FeatureSpaceScorer with `spec` (an Extractor,
    or a spec string for `features.make_extractor`). primary "" = "features" when spec is set."""
    if not spec:
        if primary == "features":
            raise config_lib.ConfigError("primary score 'features' needs a feature extractor")
        return scorer
    if isinstance(spec, str):
        from cxrjax import features  # loads classifier code only when asked for

        spec = features.make_extractor(spec)
    return FeatureSpaceScorer(scorer, spec, primary=primary or "features", mesh=mesh)


def load_scorer(method: str, workdir: str, *, mesh=None, **options) -> Scorer:
    """The scorer of `method` from a workdir.

    "fanogan": `workdir` is an anomaly run (launch.train_anomaly) holding the trained encoder;
    its config names the PGGAN run. Options: normal_class, kappa (default: the run's).
    "ddpm": `workdir` is a DDPM run (launch.train_ddpm). Options: normal_class ("normal"),
    t_star (200), steps (10), metric ("mse" | "l1"), eta (0), guidance (0), seed (0).
    Both: features (a `cxrjax.features` spec, "" = pixel space only) and primary ("" |
    "pixels" | "features"), see `with_features`.
    """
    if method not in METHODS:
        raise config_lib.ConfigError(f"method must be one of {METHODS}, got {method!r}")
    mesh = mesh or parallel.make_mesh()
    space = {"spec": options.pop("features", ""), "primary": options.pop("primary", "")}
    if method == "ddpm":
        known = {"normal_class", "t_star", "steps", "metric", "eta", "guidance", "seed"}
        _check_options(options, known)
        options.setdefault("normal_class", NORMAL)
        scorer = DDPMScorer(load_generator_run(workdir, "ddpm", mesh), mesh=mesh, **options)
        return with_features(scorer, mesh=mesh, **space)
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
    state, step = runs.restore(
        workdir, jax.eval_shape(init_fn, jax.random.PRNGKey(int(config.seed))), mesh=mesh
    )
    scorer = FAnoGANScorer(
        run,
        encoder,
        state.params,
        normal_class=options.get("normal_class", config.data.normal_class),
        kappa=options.get("kappa", config.fanogan.kappa),
        mesh=mesh,
        extra_info={"encoder_workdir": workdir, "encoder_step": step},
    )
    return with_features(scorer, mesh=mesh, **space)


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
    batches = anomaly_report.scorer_batches(
        scorer, source, spec, batch_size=batch_size, num_workers=num_workers
    )
    chunks: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for batch in batches:
        arrays = loop.device_batch(batch, mesh)
        out = scorer.outputs(arrays["image"], indices=arrays["index"])
        wanted = {k: v for k, v in out.items() if k.startswith(("score", "terms/"))}
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
    out.setdefault("score/pixels", out["score"])  # a pixel-space-only scorer
    order = np.argsort(out["index"], kind="stable")
    return {key: value[order] for key, value in out.items()}


def score_labelled(scorer: Scorer, source, spec, normal_class: str, split: str, **options):
    """`score_split` plus "y" (1 = abnormal); ConfigError unless both classes are present."""
    out = score_split(scorer, source, spec, name=split, **options)
    out["y"] = anomaly_labels(out["label"], spec.class_names, normal_class)
    if out["y"].min() == out["y"].max():
        raise config_lib.ConfigError(
            f"the {split} split holds only {'abnormal' if out['y'][0] else 'normal'} "
            "images: ROC-AUC and the threshold need both"
        )
    return out


@dataclasses.dataclass
class Selection:
    """A scorer setting chosen on validation (`select_on_validation`)."""

    name: str  # the setting, e.g. "t_star"
    chosen: Any
    scorer: Scorer
    val: dict[str, np.ndarray]  # the chosen scorer's `score_labelled` validation output
    record: dict[str, Any]  # JSON: grid, validation AUCs per value and space, choice
    grid_scores: dict[str, np.ndarray]  # space -> [G, N] validation scores of every value


def select_on_validation(
    candidates: Mapping[Any, Any], source, spec, normal_class: str, *, name: str, **options
) -> Selection:
    """Scores validation with every candidate {value: () -> Scorer} (built one at a time),
    keeps the value with the highest validation ROC-AUC in the scorers' primary space (the
    first in grid order on a tie). Only validation is read; `options` go to `score_split`.
    """
    if not candidates:
        raise config_lib.ConfigError(f"no {name} values to choose from")
    best, aucs, grid = None, {}, collections.defaultdict(list)
    for value, make in candidates.items():
        scorer = make()
        out = score_labelled(scorer, source, spec, normal_class, f"val ({name}={value})", **options)
        aucs[str(value)] = {s: _metrics(out["y"], out[f"score/{s}"])["auc"] for s in scorer.spaces}
        for space in scorer.spaces:
            grid[space].append(out[f"score/{space}"])
        logging.info("[select] %s %s=%s: validation ROC-AUC %s", scorer.method, name, value,
                     aucs[str(value)])  # fmt: skip
        if best is None or aucs[str(value)][scorer.primary] > best[0]:
            best = (aucs[str(value)][scorer.primary], value, scorer, out)
    _, chosen, scorer, val = best
    record = {
        "grid": [v for v in candidates],
        "space": scorer.primary,
        "split": "val",
        "rule": "highest validation ROC-AUC in the primary space; ties: first in grid order",
        "val_auc": aucs,
        "chosen": chosen,
    }
    scores = {space: np.stack(values) for space, values in grid.items()}
    return Selection(name, chosen, scorer, val, record, scores)


def evaluate(
    scorer: Scorer | None,
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
    selection: Selection | None = None,
) -> dict[str, Any]:
    """Normal-vs-abnormal evaluation on splits["val"] and splits["test"]; writes output_dir/.

    Per score space of the scorer (pixels; features too for a FeatureSpaceScorer) the
    threshold is `select_threshold(val labels, val scores, threshold)`: test scores never
    reach it. Test metrics come with `level` bootstrap CIs over test images (`n_bootstrap`
    resamples, stratified); validation metrics are point values. results["scores"][space]
    holds each space; the top-level "val", "test" and "threshold" are the primary space's
    (results["primary_score"]). A space whose validation ROC-AUC is below 0.5 adds a plain
    sentence to results["warnings"]; no score is ever flipped. `selection` (from
    `select_on_validation`): its scorer and validation scores are used (`scorer` may be None),
    test is scored once, and results["<name>_selection"] records the choice. Files (process
    0): results.json, results.md, roc.png, residuals.png, {val,test}_scores.npz ("score" =
    primary, "score_<space>", terms, dataset label, y = 1 for abnormal, record index; val
    also "grid_<name>" and "grid_score_<space>" [G, N] under a selection).
    """
    if threshold not in ("youden", "f1"):
        raise config_lib.ConfigError(f"threshold must be 'youden' or 'f1', got {threshold!r}")
    check_normal_class(spec, normal_class)
    mesh = mesh or parallel.make_mesh()
    parallel.check_global_batch(batch_size, mesh, "eval batch")
    options = dict(batch_size=batch_size, mesh=mesh, num_workers=num_workers)
    scored = {}
    if selection is not None:
        scorer, scored["val"] = selection.scorer, selection.val
    for split in ("val", "test"):
        if split not in scored:
            scored[split] = score_labelled(
                scorer, splits[split], spec, normal_class, split, **options
            )
    val, test = scored["val"], scored["test"]
    spaces = {}
    for space in scorer.spaces:
        key = f"score/{space}"
        chosen = cls_metrics.select_threshold(val["y"], val[key], threshold)  # validation only
        common = dict(threshold=chosen, class_names=TASK_CLASSES, seed=seed, level=level)
        description = scorer.info.get("score" if space == "pixels" else "feature_score")
        spaces[space] = {
            "description": description,
            "threshold": chosen,
            "val": cls_metrics.evaluate(val["y"], val[key], n_bootstrap=0, **common),
            "test": cls_metrics.evaluate(test["y"], test[key], n_bootstrap=n_bootstrap, **common),
        }
    primary = spaces[scorer.primary]
    warnings = anomaly_report.below_chance_warnings(scorer.method, spaces)
    for warning in warnings:
        logging.warning("%s", warning)
    terms = {}
    for key in sorted(k for k in test if k.startswith("terms/")):
        terms[key.removeprefix("terms/")] = {
            split: {
                m: _metrics(scored[split]["y"], scored[split][key])[m] for m in ("auc", "pr_auc")
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
        "direction": "higher score = more anomalous (fixed in advance, never flipped)",
        "primary_score": scorer.primary,
        "threshold": primary["threshold"],
        "threshold_method": threshold,
        "threshold_split": "val",
        "val": primary["val"],
        "test": primary["test"],
        "scores": spaces,
        "warnings": warnings,
        "terms": terms,
        "seed": int(seed),
        "software": results_lib.software_versions(),
        "device": results_lib.device_description(),
        **dict(extra or {}),
    }
    if selection is not None:
        results[f"{selection.name}_selection"] = selection.record
    k = int(num_examples)
    examples = (
        anomaly_report.example_indices(test["y"], test["index"], k)
        if k
        else np.zeros((0,), np.int64)
    )
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
            arrays = {k.replace("/", "_"): v for k, v in out.items()}
            if split == "val" and selection is not None:
                arrays[f"grid_{selection.name}"] = np.asarray(selection.record["grid"])
                for space, values in selection.grid_scores.items():
                    arrays[f"grid_score_{space}"] = values
            fileio.save_npz(os.path.join(output_dir, f"{split}_scores.npz"), **arrays)
        anomaly_report.save_roc_figure(
            scored, scorer.spaces, os.path.join(output_dir, "roc.png"), scorer.method
        )
        write_markdown(os.path.join(output_dir, "results.md"), results)
        results_lib.save_results(os.path.join(output_dir, "results.json"), results)
    return results


def _metrics(y, scores) -> dict[str, Any]:
    return cls_metrics.evaluate(y, scores, n_bootstrap=0, class_names=TASK_CLASSES)


# Reporting lives in cxrjax.anomaly_report; these names stay importable from here.
save_residual_figure = anomaly_report.save_residual_figure
write_markdown = anomaly_report.write_markdown


def load_results(output_dir: str) -> dict[str, Any] | None:
    path = os.path.join(output_dir, "results.json")
    return json.loads(fileio.read_text(path)) if os.path.exists(path) else None
