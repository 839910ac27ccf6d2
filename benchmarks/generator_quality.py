r"""Synthetic quality vs training seconds, per generator, with the experiment's own judge.

  python -m benchmarks.generator_quality --preset=demo --kind=ddpm --workdir=/tmp/gq \
      --eval_every=100 [--eta_compare]

Trains the experiment preset's generator (its exact sub-run config: scarce split, budget)
through its own driver, stopping every `--eval_every` steps (PGGAN: at every phase end) to
measure the latest checkpoint: class fidelity of `--per_class` synthetic images per class (the
share the judge assigns to the intended class) beside real validation images, and the Fréchet
distance between synthetic and real scarce-class images in the judge's feature space.
Training seconds are the driver's own wall time (results.json `wall_time_s`, whole sessions),
so restarts between measurements are not counted. `--eta_compare` also samples the final
DDPM with DDIM eta = 0 and eta = 1 (and optionally other step counts), on the same noise.
The judge is the experiment's (`experiment.judge_config`), trained once into WORKDIR/judge.
Writes WORKDIR/generator_quality_<kind>.json and prints a Markdown table.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags, logging

_PRESET = flags.DEFINE_string("preset", "demo", "configs/experiment.py preset")
_KIND = flags.DEFINE_enum("kind", "ddpm", ["ddpm", "pggan"], "generator")
_WORKDIR = flags.DEFINE_string("workdir", None, "where to train and measure", required=True)
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 100, "DDPM steps between measurements")
_PER_CLASS = flags.DEFINE_integer("per_class", 128, "synthetic images per class per measure")
_ETA = flags.DEFINE_bool("eta_compare", False, "final DDPM: DDIM eta 0 vs 1")
_STEPS = flags.DEFINE_integer("num_steps", 0, "override the preset's DDPM steps (0 = keep)")
_OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "FIELD=VALUE for the generator's sub-config, e.g. diffusion.prediction=v"
)
_ETA_STEPS = flags.DEFINE_list("eta_steps", ["20"], "DDIM step counts for --eta_compare")
_RUN = flags.DEFINE_string(
    "run", "", "measure a finished run's saved checkpoints instead of training (its workdir)"
)
_CHECKPOINTS = flags.DEFINE_string(
    "checkpoints", "", "with --run: a folder of that run's checkpoint steps copied as it trained"
)


def training_seconds(path: str, until: int | None = None) -> float:
    """Seconds of training steps so far: the sum over logged windows of steps / (steps/s), so
    process restarts between measurements (data loading, compiles) are not counted."""
    seconds, last = 0.0, 0
    seen = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rate = row.get("perf/steps_per_s")
            if row["step"] in seen or not rate or (until is not None and row["step"] > until):
                continue
            seen.add(row["step"])
            seconds += (row["step"] - last) / rate
            last = row["step"]
    return round(seconds, 1)


def measure_saved(kind, judge, real, names, scarce) -> list[dict]:
    """The quality of every saved checkpoint step of a finished run (`--run`, `--checkpoints`):
    each step is restored from a scratch workdir holding the run's config and that step."""
    import shutil
    import tempfile

    run = os.path.abspath(_RUN.value)
    folder = _CHECKPOINTS.value or os.path.join(run, "checkpoints")
    curve = []
    for step in sorted(int(name) for name in os.listdir(folder) if name.isdigit()):
        scratch = tempfile.mkdtemp(prefix="gq_")
        shutil.copy(os.path.join(run, "config.json"), scratch)
        shutil.copytree(
            os.path.join(folder, str(step)), os.path.join(scratch, "checkpoints", str(step))
        )
        seconds = training_seconds(os.path.join(run, "metrics.jsonl"), until=step)
        point = _measure(kind, scratch, judge, real, names, scarce, _PER_CLASS.value)
        point.update(step=step, train_seconds=seconds)
        curve.append(point)
        logging.info("[generator_quality] %s", json.dumps(point))
        shutil.rmtree(scratch, ignore_errors=True)
    return curve


def _judge(config, workdir, info):
    from cxrjax import experiment
    from cxrjax.experiment import stages
    from cxrjax.train import classifier_run

    judge_dir = os.path.join(workdir, "judge")
    classifier_run.train_and_evaluate(experiment.judge_config(config), judge_dir)
    return stages.Judge(judge_dir, info, config.scarcity.class_name)


def _measure(kind, generator_dir, judge, real, names, scarce, per_class, **sampler):
    from cxrjax import features, synthesis
    from cxrjax.metrics import generative, utility

    sample_fn, info = synthesis.load_generator(kind, generator_dir, **sampler)
    import jax

    images, labels = [], []
    for c, name in enumerate(names):
        label = info["class_names"].index(name)
        batch = sample_fn(jax.random.PRNGKey(1234 + c), np.full((per_class,), label, np.int32))
        images.append(batch)
        labels.append(np.full(per_class, c))
    images, labels = np.concatenate(images), np.concatenate(labels)
    resolution = real["images"].shape[1]
    if images.shape[1] != resolution:
        from cxrjax.data import imageio

        images = np.stack([imageio.resize_square(im, resolution) for im in images])
    probs = judge.probs(images)
    fidelity = utility.class_fidelity(probs, labels, names)
    s = names.index(scarce)
    real_feats = features.extract(judge.features, real["images"][real["labels"] == s])
    synth_feats = features.extract(judge.features, images[labels == s])
    fd = generative.frechet_distance(real_feats, synth_feats)
    return {
        "checkpoint_step": info["checkpoint_step"],
        "class_fidelity": {n: fidelity[n]["assigned_fraction"] for n in names},
        "mean_confidence": {n: fidelity[n]["mean_confidence"] for n in names},
        "fd_scarce_judge": float(fd),
        "sampler": {k: info.get(k) for k in ("sampler", "steps", "guidance", "eta")},
    }


def main(argv):
    del argv
    import configs.experiment as experiment_configs
    from cxrjax import experiment, fileio
    from cxrjax.experiment import stages, utility
    from cxrjax.metrics import utility as utility_metrics
    from cxrjax.train import diffusion_run, gan_run

    config = experiment_configs.get_config(_PRESET.value)
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    data = stages.prepare_data(config, workdir)
    info = data["info"]
    judge = _judge(config, workdir, info)
    real = utility.real_probabilities(config, data, judge)
    names, scarce = judge.class_names, config.scarcity.class_name
    real_fidelity = {
        n: v["assigned_fraction"]
        for n, v in utility_metrics.class_fidelity(real["probs"], real["labels"], names).items()
    }
    kind = _KIND.value
    sub = experiment.generator_config(config, kind)
    if kind == "ddpm" and _STEPS.value:
        sub.train.num_steps = _STEPS.value
    for item in _OVERRIDE.value:
        field, _, text = item.partition("=")
        parent, _, leaf = field.rpartition(".")
        node = sub
        for part in parent.split(".") if parent else []:
            node = node[part]
        node[leaf] = type(node[leaf])(text) if not isinstance(node[leaf], bool) else text == "True"
    generator_dir = os.path.join(workdir, kind)
    driver = diffusion_run if kind == "ddpm" else gan_run
    if kind == "ddpm":
        total = int(sub.train.num_steps)
        stops = list(range(_EVAL_EVERY.value, total, _EVAL_EVERY.value)) + [total]
        sub.train.checkpoint_every = _EVAL_EVERY.value
    else:
        phases = gan_run.config_phases(sub)
        stops = [gan_run.phase_end_step(p, int(sub.train.global_batch_size)) for p in phases]
        stops = stops[len(stops) // 2 :]  # the low resolutions say little about the end result
    curve = []
    if _RUN.value:
        curve = measure_saved(kind, judge, real, names, scarce)
        stops = []
    for stop in stops:
        driver.train_and_evaluate(sub, generator_dir, stop_at=stop)
        seconds = training_seconds(os.path.join(generator_dir, "metrics.jsonl"))
        start = time.perf_counter()
        point = _measure(kind, generator_dir, judge, real, names, scarce, _PER_CLASS.value)
        point.update(
            step=int(stop), train_seconds=seconds, measure_seconds=time.perf_counter() - start
        )
        curve.append(point)
        logging.info("[generator_quality] %s", json.dumps(point))
    out = {
        "preset": _PRESET.value,
        "kind": kind,
        "overrides": list(_OVERRIDE.value),
        "judge_real_val_fidelity": real_fidelity,
        "curve": curve,
    }
    if _ETA.value and kind == "ddpm":
        out["eta"] = [
            {"eta": eta, "steps": steps, **_measure(
                kind, generator_dir, judge, real, names, scarce, _PER_CLASS.value,
                steps=steps, eta=eta,
            )}
            for eta in (0.0, 1.0)
            for steps in (int(n) for n in _ETA_STEPS.value)
        ]  # fmt: skip
    fileio.write_json(os.path.join(workdir, f"generator_quality_{kind}.json"), out)
    print(f"| step | train s | fidelity {scarce} | fidelity other | FD {scarce} (judge) |")
    print("| --- | --- | --- | --- | --- |")
    other = [n for n in names if n != scarce]
    for p in curve:
        others = ", ".join(f"{p['class_fidelity'][n]:.3f}" for n in other)
        print(
            f"| {p['step']} | {p['train_seconds']} | {p['class_fidelity'][scarce]:.3f} | "
            f"{others} | {p['fd_scarce_judge']:.3g} |"
        )
    print(f"real validation fidelity: {real_fidelity}")
    for row in out.get("eta", []):
        print(f"eta {row['eta']} steps {row['steps']}: fidelity {row['class_fidelity']} "
              f"FD {row['fd_scarce_judge']:.3g}")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
