"""One synthesis interface for both generators: PGGAN (EMA G) and DDPM (EMA params).

  sample_fn, info = load_generator("ddpm", "/tmp/ddpm", sampler="ddim", steps=50)
  images = sample_fn(jax.random.PRNGKey(0), np.array([0, 1]))  # uint8 [2, H, W]

  synthesize("pggan", "/tmp/pggan", num_images=100, output="/tmp/synth", label="pneumonia")

`synthesize` writes output/<class_name>/<generator>_s<seed>_<i:06d>.png and
output/provenance.json, the layout the image_folder builder reads (its "class_names" keep the
real dataset's label order). The same (workdir checkpoint, seed, options) give the same bytes.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from cxrjax import checkpoint as checkpoint_lib
from cxrjax import parallel
from cxrjax.data import builders, imageio
from cxrjax.train import diffusion as diffusion_train
from cxrjax.train import gan, gan_run, optim

GENERATORS = ("pggan", "ddpm")
SAMPLERS = ("ddim", "ddpm")
UNCONDITIONAL_CLASS = "synthetic"


def _run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir} is not a generator run workdir")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def _dataset_spec(data, resolution) -> Any:
    options = {
        "data_dir": data.data_dir or None,
        "manual_dir": data.manual_dir or None,
        "resolution": resolution or None,
        "skip_corrupt": data.skip_corrupt,
    }
    if data.labels:
        options["labels"] = data.labels
    return builders.spec(builders.prepare(data.name, **options))


def _restore_latest(workdir: str, abstract) -> tuple[Any, int]:
    directory = os.path.join(workdir, "checkpoints")
    missing = FileNotFoundError(f"no checkpoint in {workdir} (looked in {directory})")
    if not os.path.isdir(directory):
        raise missing
    checkpointer = checkpoint_lib.Checkpointer(directory, async_save=False)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise missing
        mesh = parallel.make_mesh()
        target = checkpoint_lib.abstract_like(abstract, parallel.replicated(mesh))
        state, _ = checkpointer.restore(step, target)
        return state, int(step)
    finally:
        checkpointer.close()


def _to_uint8(images) -> np.ndarray:
    images = np.asarray(jax.device_get(images), np.float32)
    if images.ndim == 4:
        images = images[..., 0]
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def load_generator(
    kind: str,
    workdir: str,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    guidance: float | None = None,
    eta: float | None = None,
) -> tuple[Callable[[jax.Array, np.ndarray], np.ndarray], dict[str, Any]]:
    """(sample_fn(rng, labels) -> uint8 [B, H, W], info) from the latest checkpoint's EMA params.

    PGGAN samples at the run's max resolution with alpha = 1 (latents drawn from `rng`); DDPM
    samples by DDIM with `steps` and `eta`, or sampler="ddpm" (all T steps, eta = 1).
    `guidance` / `eta` None use the run's config.sample.guidance_scale / sample.eta (DDPM only;
    runs without sample.eta used eta = 0).
    """
    if kind not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {kind!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = _run_config(workdir)
    resolution = int(config.data.resolution)
    info: dict[str, Any] = {"generator": kind, "workdir": workdir, "resolution": resolution}
    mesh = parallel.make_mesh()
    rng0 = jax.random.PRNGKey(int(config.seed))
    if kind == "pggan":
        spec = _dataset_spec(config.data, config.data.source_resolution)
        generator, discriminator = gan.make_models(config.model, spec.num_classes, resolution)
        tx = gan.make_optimizer(config.optim)
        init_fn = functools.partial(gan_run.init_state_fn, generator, discriminator, tx, tx)
        state, step = _restore_latest(workdir, jax.eval_shape(init_fn, rng0))
        params = state.g_ema_params
        conditional = generator.num_classes > 0
        sample = gan.make_sample_fn(generator)

        def draw(rng, labels):
            latents = jax.random.normal(rng, (labels.shape[0], generator.latent_dim))
            return sample(params, latents, labels, 1.0, resolution=resolution)

        info.update(sampler="pggan", steps=None, guidance=None)
    else:
        spec = _dataset_spec(config.data, config.data.resolution)
        model = diffusion_train.make_model(config.model, spec.num_classes)
        schedule = diffusion_train.make_noise_schedule(config.diffusion)
        tx, _ = optim.make_optimizer(config.optim, int(config.train.num_steps))
        image_shape = (resolution, resolution, 1)
        init_fn = functools.partial(diffusion_train.init_state, model, tx, image_shape=image_shape)
        state, step = _restore_latest(workdir, jax.eval_shape(init_fn, rng0))
        params = state.ema_params
        conditional = model.num_classes > 0
        if sampler == "ddpm":
            steps, eta = int(config.diffusion.num_timesteps), 1.0
        guidance = float(config.sample.guidance_scale if guidance is None else guidance)
        if eta is None:
            eta = float(config.sample.get("eta", 0.0))
        sample = jax.jit(
            diffusion_train.make_sample_fn(
                model,
                schedule,
                image_shape,
                steps=int(steps),
                prediction=config.diffusion.prediction,
                guidance_scale=guidance if conditional else 0.0,
                eta=float(eta),
            )
        )

        def draw(rng, labels):
            return sample(params, rng, labels)

        info.update(sampler=sampler, steps=int(steps), guidance=guidance, eta=float(eta))
    class_names = list(spec.class_names) if conditional else [UNCONDITIONAL_CLASS]
    info.update(checkpoint_step=step, class_names=class_names, conditional=conditional)

    def sample_fn(rng, labels) -> np.ndarray:
        labels = np.asarray(labels, np.int32)
        images = draw(parallel.replicate(np.asarray(rng), mesh), parallel.replicate(labels, mesh))
        return _to_uint8(images)

    return sample_fn, info


def _label_index(label, class_names: list[str], conditional: bool) -> int | None:
    if label is None:
        return None
    if not conditional:
        raise ValueError("label: this generator is unconditional; leave label unset")
    if isinstance(label, str) and not label.lstrip("-").isdigit():
        if label not in class_names:
            raise ValueError(f"label {label!r} is not one of {class_names}")
        return class_names.index(label)
    index = int(label)
    if not 0 <= index < len(class_names):
        raise ValueError(f"label {index} out of range for classes {class_names}")
    return index


def synthesize(
    kind: str,
    workdir: str,
    *,
    num_images: int,
    output: str,
    label: int | str | None = None,
    seed: int = 0,
    batch_size: int = 64,
    sampler: str = "ddim",
    steps: int = 50,
    guidance: float | None = None,
    eta: float | None = None,
) -> dict[str, Any]:
    """Writes `num_images` PNGs under output/<class_name>/ plus output/provenance.json.

    `label` is a class index or name; None spreads the images evenly over the classes (image i
    gets class i mod K). Batch b draws from fold_in(PRNGKey(seed), b); the last batch is padded
    to `batch_size`, so one compile serves all and a seed always gives the same bytes.
    Returns the provenance.
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError("num_images and batch_size must be positive")
    sample_fn, info = load_generator(
        kind, workdir, sampler=sampler, steps=steps, guidance=guidance, eta=eta
    )
    class_names = info["class_names"]
    index = _label_index(label, class_names, info["conditional"])
    if index is None:
        labels = np.arange(num_images, dtype=np.int32) % len(class_names)
    else:
        labels = np.full((num_images,), index, np.int32)
    if not info["conditional"]:
        labels = np.zeros_like(labels)
    output = os.path.abspath(os.path.expanduser(output))
    counts = {name: 0 for name in class_names}
    base = jax.random.PRNGKey(int(seed))
    for b, start in enumerate(range(0, num_images, batch_size)):
        chunk = labels[start : start + batch_size]
        padded = np.zeros((batch_size,), np.int32)
        padded[: len(chunk)] = chunk
        images = sample_fn(jax.random.fold_in(base, b), padded)[: len(chunk)]
        if not parallel.is_main_process():
            continue
        for offset, (image, lab) in enumerate(zip(images, chunk, strict=True)):
            name = class_names[int(lab)]
            folder = os.path.join(output, name)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{kind}_s{int(seed)}_{start + offset:06d}.png")
            with open(path, "wb") as f:
                f.write(imageio.encode_png(image))
            counts[name] += 1
    provenance = {
        "generator": kind,
        "workdir": info["workdir"],
        "checkpoint_step": info["checkpoint_step"],
        "seed": int(seed),
        "sampler": info["sampler"],
        "steps": info["steps"],
        "guidance": info["guidance"],
        "class_names": class_names,
        "counts": counts,
        "num_images": int(num_images),
        "resolution": info["resolution"],
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if parallel.is_main_process():
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, "provenance.json"), "w", encoding="utf-8") as f:
            json.dump(provenance, f, indent=2)
    return provenance
