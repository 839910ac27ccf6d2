"""Image -> feature-vector extractors for the synthetic-image quality metrics, behind one interface.

An extractor is named by a spec string:

  pixels[:N]                 flattened pixels in [0, 1] after an antialiased (triangle-filter)
                             resize to N x N (default 16: 256-d). Cheap, offline, no weights:
                             for tests and sanity checks, not for judging realism.
  cxr:<classifier workdir>   the project's DenseNet classifier from `launch.train_classifier`:
                             global-pooled penultimate features (1024-d for DenseNet121; the
                             workdir model's width in general), best-by-validation checkpoint
                             (else the latest), EMA weights when the run kept them. Inputs get
                             the classifier's own preprocessing: an antialiased resize to its
                             config's resolution (as datasets are prepared) and (x - mean) / std.
  inception:<weights file>   FID Inception-v3 pool3 (2048-d) from pytorch-fid's weight file
                             (`cxrjax.models.inception`: 299 px bilinear resize without
                             antialias, gray -> RGB, [-1, 1], exactly as pytorch-fid).

Every extractor takes uint8 grayscale images [N, H, W] (or [N, H, W, 1]) and returns float32
[N, D]. `extract` runs it in batches under `jax.jit`, the batch sharded over the "data" axis of
the device mesh (parameters replicated; the last batch padded), logs progress, and caches the
result on disk as `<cache_dir>/<kind>-<key>.npz`, the key a hash of the extractor's
fingerprint (weights file hash, or workdir + checkpoint step + config), the caller's dataset
identity and the image bytes themselves, so a changed image or checkpoint never reuses features.

`check_spec` validates a spec (scheme, files) without loading anything, so entry points fail
before any compute.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cxrjax import config as config_lib
from cxrjax import fileio, parallel
from cxrjax.config import ConfigError
from cxrjax.data import imageio

KINDS = ("pixels", "cxr", "inception")
DEFAULT_PIXELS_SIZE = 16
CACHE_ENV = "CXRJAX_FEATURE_CACHE"
SPEC_HELP = "pixels[:N] | cxr:<classifier workdir> | inception:<weights file>"


@dataclasses.dataclass(frozen=True)
class Extractor:
    """A feature extractor ready to run.

    apply_fn(params, images) maps float32 [B, H, W, 1] in [0, 1] to [B, dim]; it is pure and
    jittable. `input_size` asks for a host-side antialiased resize to that square size first
    (None: any size is fine). `fingerprint` identifies the weights for the feature cache.
    """

    spec: str
    kind: str
    dim: int
    apply_fn: Callable[[Any, jax.Array], jax.Array]
    params: Any
    fingerprint: str
    input_size: int | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for reports."""
        return {"spec": self.spec, "kind": self.kind, "dim": self.dim, **self.info}


# ----------------------------------------------------------------------------- specs
def parse_spec(spec: str) -> tuple[str, str]:
    """'cxr:/runs/cls' -> ('cxr', '/runs/cls'); ConfigError for an unknown or incomplete spec."""
    kind, _, arg = str(spec).partition(":")
    if kind not in KINDS:
        raise ConfigError(f"unknown feature extractor {spec!r}; use {SPEC_HELP}")
    if kind == "pixels":
        if arg and (not arg.isdigit() or int(arg) < 1):
            raise ConfigError(f"pixels:N needs a positive integer size, got {spec!r}")
    elif not arg:
        raise ConfigError(f"{kind} needs a path: {SPEC_HELP}")
    return kind, arg


def check_spec(spec: str) -> None:
    """Fails fast (ConfigError, FileNotFoundError) on a spec that cannot be built; loads nothing."""
    kind, arg = parse_spec(spec)
    path = os.path.expanduser(arg)
    if kind == "inception" and not os.path.isfile(path):
        from cxrjax.models import inception

        raise FileNotFoundError(inception.missing_weights_message(path))
    if kind == "cxr":
        if not os.path.isdir(path):
            raise FileNotFoundError(f"classifier workdir {path!r} does not exist")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"{path} has no config.json: not a launch.train_classifier workdir"
            )
        if not os.path.isdir(os.path.join(path, "checkpoints")):
            raise FileNotFoundError(f"{path} has no checkpoints/ (has the classifier trained?)")


def make_extractor(spec: str, *, step: int | None = None) -> Extractor:
    """Builds the extractor named by `spec` (loads weights / restores the checkpoint).

    `step` picks a classifier checkpoint for `cxr:` (default: best by validation, else latest).
    """
    check_spec(spec)
    kind, arg = parse_spec(spec)
    if kind == "pixels":
        return pixels_extractor(int(arg) if arg else DEFAULT_PIXELS_SIZE)
    if kind == "inception":
        return inception_extractor(arg)
    return cxr_extractor(arg, step=step)


# ----------------------------------------------------------------------------- extractors
def _pixels_apply(params, images, *, size: int):
    del params
    b, h, w, c = images.shape
    if (h, w) != (size, size):
        # Triangle filter widened by the scale factor when shrinking: an area-like average.
        images = jax.image.resize(images, (b, size, size, c), "linear", antialias=True)
    return images.reshape(b, -1)


@functools.cache
def pixels_extractor(size: int = DEFAULT_PIXELS_SIZE) -> Extractor:
    """Flattened [0, 1] pixels after an antialiased resize to size x size.

    Cached per size, so repeated calls share one apply_fn and hence one compiled function.
    """
    if size < 1:
        raise ConfigError(f"pixels size must be positive, got {size}")
    return Extractor(
        spec=f"pixels:{size}",
        kind="pixels",
        dim=size * size,
        apply_fn=functools.partial(_pixels_apply, size=size),
        params={},
        fingerprint=f"pixels:{size}:linear-antialias",
        info={"size": size},
    )


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def inception_extractor(weights_path: str) -> Extractor:
    """FID Inception-v3 pool3 features from pytorch-fid's weight file (.pth or .npz copy)."""
    from cxrjax.models import inception

    path = os.path.abspath(os.path.expanduser(weights_path))
    variables = inception.load_fid_weights(path)
    model = inception.FIDInceptionV3()

    def apply_fn(params, images):
        return model.apply(params, inception.preprocess(images))

    sha = _file_sha256(path)
    return Extractor(
        spec=f"inception:{path}",
        kind="inception",
        dim=inception.NUM_FEATURES,
        apply_fn=apply_fn,
        params=variables,
        fingerprint=f"inception:{sha}",
        info={
            "weights": path,
            "weights_sha256": sha,
            "preprocessing": "gray->RGB, bilinear to 299 without antialias "
            "(torch align_corners=False), 2x-1 (as pytorch-fid)",
        },
    )


def cxr_extractor(
    workdir: str, *, step: int | None = None, probabilities: bool = False
) -> Extractor:
    """Pooled penultimate features of a train_classifier run's checkpoint.

    `probabilities=True` gives the class probabilities instead (softmax; sigmoid for
    multi-label), as a judge of what class an image looks like (`cxrjax.metrics.utility`).

    The model and its input preprocessing come from the run's config.json. The number of
    classes (the shape of the checkpoint's head) comes from the run's dataset, opened as
    evaluate_checkpoint does (prepared datasets are only read).
    """
    from cxrjax.train import classifier_checks, runs

    workdir = os.path.abspath(os.path.expanduser(workdir))
    check_spec(f"cxr:{workdir}")
    config = runs.read_config(workdir, "train_classifier")
    classifier_checks.validate(config)
    mesh = parallel.make_mesh()
    run = runs.load(workdir, step=step, mesh=mesh)
    state, step, spec = run.state, run.step, run.spec
    model, resolution = run.modules["model"], int(config.data.resolution)
    step_dir = os.path.join(workdir, "checkpoints", str(step))
    saved_at = os.path.getmtime(step_dir) if os.path.exists(step_dir) else 0.0
    use_ema = state.ema_params is not None
    variables = {
        "params": state.ema_params if use_ema else state.params,
        "batch_stats": state.batch_stats,
    }
    config_hash = config_lib.config_hash(config)
    return classifier_extractor(
        model,
        variables,
        mean=float(config.data.mean),
        std=float(config.data.std),
        resolution=resolution,
        spec=f"cxr:{workdir}",
        fingerprint=f"cxr:{workdir}:step{step}:{config_hash}:{saved_at:.0f}"
        + (":probs" if probabilities else ""),
        probabilities=(spec.label_kind if probabilities else None),
        info={
            "workdir": workdir,
            "checkpoint_step": int(step),
            "ema": use_ema,
            "model": config.model.name,
            "dataset": spec.name,
        },
    )


def classifier_extractor(
    model,
    variables,
    *,
    mean: float,
    std: float,
    resolution: int,
    spec: str,
    fingerprint: str,
    info: dict[str, Any] | None = None,
    probabilities: str | None = None,
) -> Extractor:
    """Pooled DenseNet features of given variables: resize to `resolution` on the host, then
    (x - mean) / std, then `model.features`. `cxr_extractor` builds one from a workdir; the
    benchmarks build one from random weights."""

    def apply_fn(params, images):
        return model.apply(params, (images - mean) / std, method="features")

    def probs_fn(params, images):
        logits = model.apply(params, (images - mean) / std, train=False).astype(jnp.float32)
        if probabilities == "multilabel":
            return jax.nn.sigmoid(logits)
        return jax.nn.softmax(logits, axis=-1)

    return Extractor(
        spec=spec,
        kind="cxr-probs" if probabilities else "cxr",
        dim=model.num_classes if probabilities else model.num_features,
        apply_fn=probs_fn if probabilities else apply_fn,
        params=variables,
        fingerprint=fingerprint,
        input_size=resolution,
        info={
            **(info or {}),
            "resolution": resolution,
            "normalization": {"mean": mean, "std": std},
        },
    )


# ----------------------------------------------------------------------------- extraction
def as_gray_uint8(images) -> np.ndarray:
    """uint8 [N, H, W] from [N, H, W] or [N, H, W, 1]; anything else is a ValueError."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"images must be uint8 [N, H, W(, 1)] grayscale, got {images.dtype} {images.shape}"
        )
    return images


def cache_key(extractor: Extractor, images: np.ndarray, data_id: str = "") -> str:
    """Hash of (extractor fingerprint, dataset identity, image shape and bytes)."""
    content = hashlib.blake2b(np.ascontiguousarray(images).data, digest_size=20).hexdigest()
    payload = json.dumps(
        [extractor.fingerprint, data_id, list(images.shape), content], sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def default_cache_dir() -> str:
    """$CXRJAX_FEATURE_CACHE, else ~/.cache/cxrjax/features."""
    return os.path.expanduser(os.environ.get(CACHE_ENV) or "~/.cache/cxrjax/features")


def _resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1:] == (size, size):
        return images
    return np.stack([imageio.resize_square(image, size) for image in images])


def _device_batch(batch: np.ndarray, sharding) -> jax.Array:
    # Every process holds the whole host batch; each device takes its rows.
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])


@functools.lru_cache(maxsize=16)
def _compiled(apply_fn, mesh):
    return jax.jit(
        lambda params, images: apply_fn(params, images.astype(jnp.float32)[..., None] / 255.0),
        in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh)),
        out_shardings=parallel.data_sharding(mesh),
        compiler_options=parallel.cpu_compiler_options(),
    )


def extract(
    extractor: Extractor,
    images,
    *,
    batch_size: int = 256,
    data_id: str = "",
    cache_dir: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    log_every_s: float = 30.0,
) -> np.ndarray:
    """Features float32 [N, D] of uint8 images [N, H, W], batched, data-parallel, cached.

    `batch_size` is rounded up to a multiple of the device count; the last batch is padded
    with blank images whose features are dropped. With `cache_dir`, a previous result for the
    same (extractor, data_id, images) is loaded instead of recomputed.
    """
    images = as_gray_uint8(images)
    n = len(images)
    path = None
    if cache_dir:
        key = cache_key(extractor, images, data_id)
        path = os.path.join(cache_dir, f"{extractor.kind}-{key}.npz")
        if os.path.isfile(path):
            with np.load(path) as cached:
                features = cached["features"]
            if features.shape == (n, extractor.dim):
                logging.info("features %s of %s: cached in %s", extractor.spec, data_id, path)
                return features
    mesh = mesh or parallel.make_mesh()
    num_devices = mesh.devices.size
    batch_size = max(num_devices, -(-min(batch_size, max(n, 1)) // num_devices) * num_devices)
    apply = _compiled(extractor.apply_fn, mesh)
    params = parallel.replicate(extractor.params, mesh)
    sharding = parallel.data_sharding(mesh)
    outputs = []
    start = last_log = time.perf_counter()
    for offset in range(0, n, batch_size):
        batch = images[offset : offset + batch_size]
        if extractor.input_size is not None:
            batch = _resize_batch(batch, extractor.input_size)
        if len(batch) < batch_size:
            pad = np.zeros((batch_size - len(batch), *batch.shape[1:]), np.uint8)
            batch = np.concatenate([batch, pad])
        outputs.append(apply(params, _device_batch(batch, sharding)))
        now = time.perf_counter()
        if now - last_log >= log_every_s:
            jax.block_until_ready(outputs[-1])
            now, done = time.perf_counter(), min(offset + batch_size, n)
            rate = done / max(now - start, 1e-9)
            logging.info(
                "features %s of %s: %d/%d images, %.1f images/s, ETA %.0f s",
                extractor.spec,
                data_id or "images",
                done,
                n,
                rate,
                (n - done) / rate,
            )
            last_log = now
    if outputs:
        features = np.concatenate([np.asarray(parallel.to_host(out)) for out in outputs])[:n]
    else:
        features = np.zeros((0, extractor.dim), np.float32)
    features = features.astype(np.float32)
    elapsed = time.perf_counter() - start
    logging.info(
        "features %s of %s: %d images in %.1f s (%.1f images/s)",
        extractor.spec,
        data_id or "images",
        n,
        elapsed,
        n / max(elapsed, 1e-9),
    )
    if path and parallel.is_main_process():
        os.makedirs(cache_dir, exist_ok=True)
        meta = {"extractor": extractor.describe(), "data_id": data_id, "shape": list(images.shape)}
        # A per-process, per-call temporary name: jobs sharing the cache never collide.
        fileio.save_npz(path, features=features, meta=json.dumps(meta, default=str))
    return features
