r"""Why deterministic DDIM (eta = 0) fails on the demo's DDPM: the evidence, from one command.

  python -m benchmarks.ddim_eta --workdir=workdirs/demo [--per_class=64] [--steps=20]

Reads a finished experiment workdir (its judge, its scarce split, its trained DDPM `ddpm/` or
`--generator`) and measures, on the same noise draws, class fidelity (the share the judge
assigns to the intended class) and the Fréchet distance to real validation images of the scarce
class in the judge's features, for:

1. the trained model with eta = 0 and eta = 1 (guidance, clipping and weights as configured,
   and each switched: no guidance, no x0 clipping, raw instead of EMA weights);
2. the *exact* denoiser of the training set (the empirical distribution's E[x0 | x_t], a
   softmax-weighted mean of the scarce split's images of the class): if eta = 0 works with it,
   the sampler is right and the failure is the learned model's;
3. eta switched at a noise level: eta = 1 above t and 0 below, and the reverse, which locates
   the steps where the damage is done;
4. the x0 estimates along the trajectory (std and the share of pixels clipped at +-1).

Writes WORKDIR/ddim_eta.json and prints Markdown tables (benchmarks/RESULTS.md quotes them).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "a finished experiment workdir", required=True)
_GENERATOR = flags.DEFINE_string("generator", "", "a DDPM run dir (default WORKDIR/ddpm)")
_PRESET = flags.DEFINE_string("preset", "demo", "the experiment preset the workdir ran")
_PER_CLASS = flags.DEFINE_integer("per_class", 64, "images per class per setting")
_STEPS = flags.DEFINE_integer("steps", 20, "DDIM steps")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    import configs.experiment as experiment_configs
    from cxrjax import diffusion, features, fileio
    from cxrjax.experiment import stages, utility
    from cxrjax.metrics import generative
    from cxrjax.metrics import utility as utility_metrics
    from cxrjax.models import unet
    from cxrjax.train import diffusion as diffusion_train
    from cxrjax.train import runs

    workdir = os.path.abspath(_WORKDIR.value)
    config = experiment_configs.get_config(_PRESET.value)
    data = stages.prepare_data(config, workdir)
    judge = stages.Judge(os.path.join(workdir, "judge"), data["info"], config.scarcity.class_name)
    real = utility.real_probabilities(config, data, judge)
    names = judge.class_names
    scarce = names.index(config.scarcity.class_name)
    real_feats = features.extract(judge.features, real["images"][real["labels"] == scarce])

    run_dir = _GENERATOR.value or os.path.join(workdir, "ddpm")
    opened = runs.load(run_dir, select="latest")
    run, state = opened.config, opened.state
    model = diffusion_train.make_model(run.model, len(data["info"]["class_names"]))
    schedule = diffusion_train.make_noise_schedule(run.diffusion)
    res = int(run.data.resolution)
    shape = (res, res, 1)
    prediction = run.diffusion.prediction
    guidance = float(run.sample.guidance_scale)
    n, steps = _PER_CLASS.value, _STEPS.value

    kept = data["kept"]
    train = stages.decode(data["splits"]["train"], kept, res).astype(np.float32) / 127.5 - 1.0
    train_x = jnp.asarray(train.reshape(len(train), -1))
    train_labels = jnp.asarray(data["labels"]["train"][kept])

    def oracle(x, t, labels):
        """E[eps | x_t] for the empirical distribution of the class's training images."""
        a = schedule.sqrt_alphas_cumprod[t].reshape(-1, *([1] * (x.ndim - 1)))
        b = schedule.sqrt_one_minus_alphas_cumprod[t].reshape(-1, *([1] * (x.ndim - 1)))
        flat = x.reshape(x.shape[0], -1)
        a1, b1 = a.reshape(-1, 1), b.reshape(-1, 1)
        dist = (
            jnp.sum(flat**2, 1, keepdims=True)
            - 2 * a1 * flat @ train_x.T
            + a1**2 * jnp.sum(train_x**2, 1)[None]
        )
        logits = jnp.where(labels[:, None] == train_labels[None], -dist / (2 * b1**2), -jnp.inf)
        x0 = (jax.nn.softmax(logits, axis=1) @ train_x).reshape(x.shape)
        return (x - a * x0) / b

    def sampler(model_fn, eta_of_t, clip, w, trace=False):
        """DDIM with a per-step eta (a function of t): the library's `diffusion.ddim_step`."""
        ts = diffusion.ddim_timesteps(schedule.num_timesteps - 1, steps)
        t_prev = np.append(ts[1:], -1)
        if w > 0:
            model_fn = diffusion.guided_model_fn(model_fn, w, model.null_id)

        @jax.jit
        def one(x, t, t_prev, eta, key, labels):
            return diffusion.ddim_step(
                model_fn, schedule, x, t, t_prev, key, labels,
                eta=eta, prediction=prediction, clip_x0=clip,
            )  # fmt: skip

        def draw(rng, labels):
            x = jax.random.normal(rng, (len(labels), *shape))
            keys = jax.random.split(jax.random.fold_in(rng, 1), len(ts))
            path = []
            for t, tp, key in zip(ts, t_prev, keys, strict=True):
                x, x0 = one(x, int(t), int(tp), float(eta_of_t(int(t))), key, labels)
                if trace:
                    path.append(
                        {
                            "t": int(t),
                            "x0_std": round(float(jnp.std(x0)), 3),
                            "x0_clipped": round(float(jnp.mean(jnp.abs(x0) > 0.99)), 3),
                        }
                    )
            return np.asarray(x), path

        return draw

    def measure(name, draw):
        start = time.perf_counter()
        images, labels, path = [], [], None
        for c in range(len(names)):
            x, p = draw(jax.random.PRNGKey(1234 + c), jnp.full((n,), c, jnp.int32))
            images.append(x)
            labels.append(np.full(n, c))
            path = path or p
        x, labels = np.concatenate(images), np.concatenate(labels)
        u8 = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
        fidelity = utility_metrics.class_fidelity(judge.probs(u8), labels, names)
        fd = generative.frechet_distance(
            real_feats, features.extract(judge.features, u8[labels == scarce])
        )
        row = {
            "setting": name,
            "fidelity": {k: round(v["assigned_fraction"], 3) for k, v in fidelity.items()},
            "fd_scarce_judge": round(float(fd), 2),
            "image_std": round(float(x.std()), 3),
            "seconds": round(time.perf_counter() - start, 1),
        }
        if path:
            row["trajectory"] = path
        print(json.dumps({k: v for k, v in row.items() if k != "trajectory"}), flush=True)
        return row

    learned = unet.make_model_fn(model, state.ema_params)
    raw = unet.make_model_fn(model, state.params)

    def eta(value):
        return lambda t: value

    rows = [
        measure("model, eta 0", sampler(learned, eta(0.0), True, guidance, trace=True)),
        measure("model, eta 1", sampler(learned, eta(1.0), True, guidance, trace=True)),
        measure("model, eta 0, no guidance", sampler(learned, eta(0.0), True, 0.0)),
        measure("model, eta 0, no x0 clipping", sampler(learned, eta(0.0), False, guidance)),
        measure("model, eta 0, raw weights (no EMA)", sampler(raw, eta(0.0), True, guidance)),
        measure("exact training-set denoiser, eta 0", sampler(oracle, eta(0.0), True, 0.0)),
        measure("exact training-set denoiser, eta 1", sampler(oracle, eta(1.0), True, 0.0)),
    ]
    for split in (900, 500):
        rows.append(
            measure(
                f"model, eta 1 for t >= {split}, 0 below",
                sampler(learned, lambda t, s=split: 1.0 if t >= s else 0.0, True, guidance),
            )
        )
        rows.append(
            measure(
                f"model, eta 0 for t >= {split}, 1 below",
                sampler(learned, lambda t, s=split: 0.0 if t >= s else 1.0, True, guidance),
            )
        )
    out = {
        "workdir": workdir,
        "generator": run_dir,
        "prediction": prediction,
        "schedule": run.diffusion.schedule,
        "guidance": guidance,
        "steps": steps,
        "per_class": n,
        "judge_real_val_fidelity": {
            k: round(v["assigned_fraction"], 3)
            for k, v in utility_metrics.class_fidelity(real["probs"], real["labels"], names).items()
        },
        "rows": rows,
    }
    fileio.write_json(os.path.join(workdir, "ddim_eta.json"), out)
    print(f"\n| setting | {' | '.join(f'fidelity {k}' for k in names)} | FD | image std |")
    print("| --- " * (len(names) + 3) + "|")
    for r in rows:
        fid = " | ".join(f"{100 * r['fidelity'][k]:.1f} %" for k in names)
        print(f"| {r['setting']} | {fid} | {r['fd_scarce_judge']} | {r['image_std']} |")
    print("\n| t | x0 std, eta 0 | clipped, eta 0 | x0 std, eta 1 | clipped, eta 1 |")
    print("| --- | --- | --- | --- | --- |")
    for a, b in zip(rows[0]["trajectory"], rows[1]["trajectory"], strict=True):
        cells = [a["t"], a["x0_std"], a["x0_clipped"], b["x0_std"], b["x0_clipped"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    app.run(main)
