"""One synthesis interface for both generators: PGGAN (EMA G) and DDPM (EMA params).

  sample_fn, info = load_generator("ddpm", "/tmp/ddpm", sampler="ddim", steps=50)
  images = sample_fn(jax.random.PRNGKey(0), np.array([0, 1]))  # uint8 [2, H, W]

  synthesize("pggan", "/tmp/pggan", num_images=100, output="/tmp/synth", label="pneumonia")

`synthesize` writes output/<class_name>/<generator>_s<seed>_<i:06d>.png and
output/provenance.json, the layout the image_folder builder reads (its "class_names" keep the
real dataset's label order). The same (workdir checkpoint, seed, options) give the same bytes.
An output folder that already holds files is refused (`mode="new"`) unless told to add to it
(`mode="append"`: provenance.json then lists every set and counts every file) or to replace
the images it holds (`mode="overwrite"`); every PNG and provenance.json is written atomically.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from cxrjax import config as config_lib
from cxrjax import fileio, parallel
from cxrjax.data import imageio
from cxrjax.train import diffusion as diffusion_train
from cxrjax.train import gan, runs

GENERATORS = ("pggan", "ddpm")
SAMPLERS = ("ddim", "ddpm")
MODES = ("new", "append", "overwrite")
UNCONDITIONAL_CLASS = "synthetic"
PROVENANCE = "provenance.json"


def run_kind(config) -> str:
    """ "pggan" or "ddpm" from a generator run's config (its sections tell them apart)."""
    if "schedule" in config and "diffusion" not in config:
        return "pggan"
    if "diffusion" in config:
        return "ddpm"
    return "unknown (not a generator)"


def _existing_images(output: str) -> list[str]:
    """Relative paths of the files under `output` (class folders included)."""
    found = []
    for root, _, names in os.walk(output):
        found += [os.path.relpath(os.path.join(root, n), output) for n in names]
    return sorted(found)


def check_request(
    kind: str, workdir: str, *, num_images: int, output: str, mode: str = "new", batch_size=1
) -> None:
    """Everything `synthesize` can refuse, checked before any file is written or compiled:
    ConfigError naming the flag and value."""
    if kind not in GENERATORS:
        raise config_lib.ConfigError(f"--generator: must be one of {GENERATORS}, got {kind!r}")
    for flag, value in (("num_images", num_images), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise config_lib.ConfigError(f"--{flag}: must be an integer >= 1, got {value!r}")
    if mode not in MODES:
        raise config_lib.ConfigError(f"mode: must be one of {MODES}, got {mode!r}")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    found = run_kind(runs.read_config(workdir, "generator run"))
    if found != kind:
        hint = f"use --generator={found}" if found in GENERATORS else "point it at a generator run"
        raise config_lib.ConfigError(
            f"--workdir={workdir} holds a {found} run (config.json), not a {kind} run; {hint}"
        )
    output = os.path.abspath(os.path.expanduser(output))
    existing = _existing_images(output) if os.path.isdir(output) else []
    if existing and mode == "new":
        raise config_lib.ConfigError(
            f"--output={output} already holds {len(existing)} files ({existing[0]}, ...); "
            "use --append to add these images (provenance.json then describes every file), "
            "--overwrite to replace them, or another --output"
        )


def _clear_output(output: str) -> None:
    """--overwrite: removes the PNGs in class folders and provenance.json (nothing else)."""
    if os.path.exists(os.path.join(output, PROVENANCE)):
        os.remove(os.path.join(output, PROVENANCE))
    for name in os.listdir(output):
        folder = os.path.join(output, name)
        if os.path.isdir(folder):
            for image in os.listdir(folder):
                if image.lower().endswith(".png"):
                    os.remove(os.path.join(folder, image))
            if not os.listdir(folder):
                os.rmdir(folder)


# An exported generator: the sampling (and scoring) weights of a finished run without its
# optimizer state, small enough to ship (cxrjax/resources/generators/): config.json,
# results.json and this file, a flat npz of "<state field>/<param path>" arrays.
EXPORT_FILE = runs.EXPORT_FILE
EXPORTED_FIELDS = {"pggan": ("g_ema_params", "d_params"), "ddpm": ("ema_params",)}


def export_generator(kind: str, workdir: str, output: str) -> str:
    """Writes `output` as an exported generator of the finished run in `workdir`.

    Keeps the EMA weights (and the PGGAN discriminator, which f-AnoGAN scores with), the run's
    config.json and results.json; `load_generator` and `cxrjax.anomaly` read it like the run.
    """
    from flax import traverse_util

    workdir = os.path.abspath(os.path.expanduser(workdir))
    run = runs.load(workdir, select="latest")
    state, step = run.state, run.step
    arrays = {}
    for field in EXPORTED_FIELDS[kind]:
        flat = traverse_util.flatten_dict(jax.device_get(getattr(state, field)), sep="/")
        arrays.update({f"{field}/{key}": np.asarray(value) for key, value in flat.items()})
    os.makedirs(output, exist_ok=True)
    fileio.save_npz(os.path.join(output, EXPORT_FILE), step=np.int64(step), **arrays)
    for name in ("config.json", "results.json"):
        source = os.path.join(workdir, name)
        if os.path.exists(source):
            fileio.write_bytes(os.path.join(output, name), open(source, "rb").read())
    return output


def _to_uint8(images) -> np.ndarray:
    images = np.asarray(jax.device_get(images), np.float32)
    if images.ndim == 4:
        images = images[..., 0]
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


# Loaded samplers of this process, by generator files and sampling options: the experiment
# draws each generator's arm, quality, filtered and CAS sets one after another, and a reused
# sampler is neither restored nor traced again. A few entries (one per generator and sampler).
_LOADED: collections.OrderedDict[tuple, tuple[Callable, dict[str, Any]]] = collections.OrderedDict()
_LOADED_MAX = 4


def _files_signature(workdir: str) -> tuple:
    """(name, size, mtime) of the run's files and checkpoint folders: a retrained, resumed or
    replaced generator in the same folder is a new key."""
    entries = []
    for folder in (workdir, os.path.join(workdir, "checkpoints")):
        if os.path.isdir(folder):
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                info = entry.stat()
                entries.append((folder, entry.name, info.st_size, info.st_mtime_ns))
    return tuple(entries)


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
    runs without sample.eta used eta = 0). A second call with the same generator files and
    options returns the sampler already loaded in this process.
    """
    if kind not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {kind!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    key = (kind, workdir, sampler, steps, guidance, eta, _files_signature(workdir))
    if key not in _LOADED:
        _LOADED[key] = _load_generator(kind, workdir, sampler, steps, guidance, eta)
        while len(_LOADED) > _LOADED_MAX:
            _LOADED.popitem(last=False)
    _LOADED.move_to_end(key)
    sample_fn, info = _LOADED[key]
    return sample_fn, dict(info)


def _load_generator(kind, workdir, sampler, steps, guidance, eta):
    mesh = parallel.make_mesh()
    run = runs.load(workdir, select="latest", mesh=mesh)
    config, spec, state, step = run.config, run.spec, run.state, run.step
    resolution = int(config.data.resolution)
    info: dict[str, Any] = {"generator": kind, "workdir": workdir, "resolution": resolution}
    if kind == "pggan":
        generator = run.modules["generator"]
        params = state.g_ema_params
        conditional = generator.num_classes > 0
        sample = gan.make_sample_fn(generator)

        film = gan.film_resolution(config)  # padded-canvas runs: crop the film back out

        def draw(rng, labels):
            latents = jax.random.normal(rng, (labels.shape[0], generator.latent_dim))
            canvas = sample(params, latents, labels, 1.0, resolution=resolution)
            return imageio.crop_content(canvas, film, axes=(1, 2))

        info.update(sampler="pggan", steps=None, guidance=None, canvas=resolution)
        info["resolution"] = film
    else:
        model = run.modules["model"]
        schedule = diffusion_train.make_noise_schedule(config.diffusion)
        image_shape = (resolution, resolution, 1)
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
            ),
            compiler_options=parallel.cpu_compiler_options(),
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
        raise config_lib.ConfigError("--label: this generator is unconditional; leave it unset")
    if isinstance(label, str) and not label.lstrip("-").isdigit():
        if label not in class_names:
            raise config_lib.ConfigError(f"--label: {label!r} is not one of {class_names}")
        return class_names.index(label)
    index = int(label)
    if not 0 <= index < len(class_names):
        raise config_lib.ConfigError(f"--label: {index} out of range for classes {class_names}")
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
    mode: str = "new",
) -> dict[str, Any]:
    """Writes `num_images` PNGs under output/<class_name>/ plus output/provenance.json.

    `mode`: "new" refuses an output folder holding files; "append" adds to it (file names
    must not collide: use another seed) and rewrites provenance.json to describe every set;
    "overwrite" first removes the PNGs and provenance.json it holds.

    `label` is a class index or name; None spreads the images evenly over the classes (image i
    gets class i mod K). Batch b draws from fold_in(PRNGKey(seed), b); the last batch is padded
    to `batch_size`, so one compile serves all and a seed always gives the same bytes.
    Returns the provenance.
    """
    check_request(
        kind, workdir, num_images=num_images, output=output, mode=mode, batch_size=batch_size
    )
    output = os.path.abspath(os.path.expanduser(output))
    previous = _read_provenance(output) if mode == "append" else None
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
    names = [
        f"{class_names[int(lab)]}/{kind}_s{int(seed)}_{i:06d}.png" for i, lab in enumerate(labels)
    ]
    if mode == "append":
        _check_append(output, previous, names, class_names, info["resolution"])
    if mode == "overwrite" and os.path.isdir(output) and parallel.is_main_process():
        _clear_output(output)
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
            fileio.write_bytes(
                os.path.join(output, names[start + offset]), imageio.encode_png(image)
            )
            counts[name] += 1
    provenance = {
        **_provenance(kind, info, seed),
        "counts": counts,
        "num_images": int(num_images),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if previous is not None:
        sets = previous.get("sets") or [{k: v for k, v in previous.items() if k != "sets"}]
        provenance = {
            **provenance,
            "counts": {n: previous["counts"].get(n, 0) + counts[n] for n in class_names},
            "num_images": int(previous["num_images"]) + int(num_images),
            "sets": [*sets, dict(provenance)],
        }
    if parallel.is_main_process():
        fileio.write_json(os.path.join(output, PROVENANCE), provenance)
    return provenance


def _provenance(kind: str, info: dict[str, Any], seed: int) -> dict[str, Any]:
    """What every synthetic set records about its generator and sampler."""
    return {
        "generator": kind,
        "workdir": info["workdir"],
        "checkpoint_step": info["checkpoint_step"],
        "seed": int(seed),
        "sampler": info["sampler"],
        "steps": info["steps"],
        "guidance": info["guidance"],
        "class_names": info["class_names"],
        "resolution": info["resolution"],
    }


def _read_provenance(output: str) -> dict[str, Any] | None:
    path = os.path.join(output, PROVENANCE)
    return json.loads(fileio.read_text(path)) if os.path.exists(path) else None


def _check_append(output, previous, names, class_names, resolution) -> None:
    """--append adds to a folder this function wrote, of the same classes and resolution."""
    existing = set(_existing_images(output)) if os.path.isdir(output) else set()
    if existing and previous is None:
        raise config_lib.ConfigError(
            f"--append: {output} holds files but no {PROVENANCE}, so they cannot be described; "
            "use --overwrite or another --output"
        )
    if previous is not None:
        same = previous.get("class_names") == class_names
        if not same or previous.get("resolution") != resolution:
            raise config_lib.ConfigError(
                f"--append: {output} holds classes {previous.get('class_names')} at "
                f"{previous.get('resolution')} px; this generator makes {class_names} at "
                f"{resolution} px; use another --output"
            )
    clash = sorted(existing.intersection(names))
    if clash:
        raise config_lib.ConfigError(
            f"--append: {len(clash)} of the new files already exist ({clash[0]}, ...); "
            "use another --seed"
        )


def synthesize_filtered(
    kind: str,
    workdir: str,
    *,
    num_images: int,
    output: str,
    intended: str,
    judge: Callable[[np.ndarray], np.ndarray],
    judge_class_names: list[str],
    thresholds: dict[str, float | None],
    max_attempts: int,
    seed: int = 0,
    batch_size: int = 64,
    pool: np.ndarray | None = None,
    pool_source: Mapping[str, Any] | None = None,
    **sampling: Any,
) -> dict[str, Any]:
    """Like `synthesize`, keeping only images a judge accepts as class `intended`.

    `sampling`: `load_generator`'s sampler options (sampler, steps, guidance, eta).

    `judge(uint8 [B, H, W]) -> probabilities [B, K]` over `judge_class_names`; an image is kept
    when the judge's top class is `intended` and its confidence >= thresholds[intended]
    (`cxrjax.metrics.utility.accept`). Samples in batches until `num_images` are kept or
    `max_attempts` images were drawn; provenance.json records attempts, acceptance rate, the
    thresholds and whether the cap stopped it short (`shortfall` > 0).

    `pool`: uint8 images [N, H, W] this generator already drew for class `intended` (e.g. the
    unfiltered set), judged first and counted as attempts, so that filtering costs only the
    extra draws that replace rejected images; `pool_source` (e.g. that set's folder and seed)
    is recorded in provenance.json.
    """
    from cxrjax.metrics import utility

    check_request(kind, workdir, num_images=num_images, output=output, batch_size=batch_size)
    if intended not in judge_class_names:
        raise config_lib.ConfigError(f"intended class {intended!r} not in {judge_class_names}")
    output = os.path.abspath(os.path.expanduser(output))
    sample_fn, info = load_generator(kind, workdir, **sampling)
    class_names = info["class_names"]
    label = _label_index(intended, class_names, info["conditional"]) if info["conditional"] else 0
    judge_label = judge_class_names.index(intended)
    labels = np.full((batch_size,), label, np.int32)
    base = jax.random.PRNGKey(int(seed))
    folder = class_names[label]
    # attempts: images drawn (and judged); passed: those the judge accepted, including any
    # beyond the requested count in the last batch, so passed / attempts is the acceptance rate.
    kept, attempts, passed, batch_index = 0, 0, 0, 0

    def judge_and_keep(images: np.ndarray) -> None:
        nonlocal kept, attempts, passed
        images = images[: max_attempts - attempts]
        attempts += len(images)
        probs = np.asarray(judge(images))
        mask = utility.accept(
            probs, np.full(len(images), judge_label), thresholds, judge_class_names
        )
        passed += int(mask.sum())
        for image in images[mask][: num_images - kept]:
            if parallel.is_main_process():
                name = f"{folder}/{kind}_s{int(seed)}_f{kept:06d}.png"
                fileio.write_bytes(os.path.join(output, name), imageio.encode_png(image))
            kept += 1

    pooled = 0 if pool is None else len(pool)
    for start in range(0, pooled, batch_size):
        if kept >= num_images or attempts >= max_attempts:
            break
        judge_and_keep(np.asarray(pool[start : start + batch_size]))
    while kept < num_images and attempts < max_attempts:
        judge_and_keep(sample_fn(jax.random.fold_in(base, batch_index), labels))
        batch_index += 1
    provenance = {
        **_provenance(kind, info, seed),
        "counts": {name: (kept if name == folder else 0) for name in class_names},
        "num_images": int(kept),
        "requested": int(num_images),
        "filter": {
            "intended": intended,
            "threshold": thresholds.get(intended),
            "thresholds": thresholds,
            "attempts": int(attempts),
            "accepted": int(kept),
            "passed": int(passed),
            "acceptance_rate": passed / attempts if attempts else None,
            "max_attempts": int(max_attempts),
            "shortfall": int(num_images - kept),
            "pool": {"images": int(pooled), **dict(pool_source or {})},
        },
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if parallel.is_main_process():
        fileio.write_json(os.path.join(output, PROVENANCE), provenance)
    return provenance
