r"""Generator throughput: PGGAN per growth phase, DDPM training and sampling beside diffusers.

    python -m benchmarks.generators --parts=pggan,ddpm,ddpm_torch --json_out=/tmp/gen.json

Parts (each in its own subprocess, so peak memory is its own):
  pggan       the production PGGAN step (`gan.make_train_step` jitted as `gan.CompiledSteps`
              does: batch sharded over "data", state replicated and donated) at every
              resolution 4 .. R for each R in --pggan_resolutions, in the middle of that
              resolution's fade-in (alpha traced). Per resolution: compile time (lower +
              compile) and images/s. --pggan_model: "official" = the paper's feature maps
              (fmap_base 8192, fmap_max 512, latent 512), "demo32" = the CPU demo nets.
              Batch per resolution from --pggan_batch (e.g. "4:64,64:32,128:16").
  ddpm        the production DDPM step (`diffusion.compile_steps`) on Ho et al.'s CIFAR-size UNet
              (`unet_cifar32`, class-conditional, 32 px, 1 channel) or --ddpm_model; then
              sampling images/s with DDIM-50 and ancestral DDPM-1000 (`lax.scan` inside jit).
  ddpm_torch  the PyTorch peer: diffusers `UNet2DModel` of the same shape (channels
              128/256/256/256, 2 res blocks, attention at 16 px and in the middle, dropout 0.1,
              class embedding), Adam, eps-MSE at random t, eager (bf16 autocast with
              --dtype=bfloat16); its shape: `torch_peers.unet_kwargs` of the JAX preset.
              Sampling with diffusers' DDIMScheduler (50) and DDPMScheduler (1000) loops.
              Skipped when diffusers is not importable.
Prints figures and never passes or fails on time.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import time

from absl import app, flags

from benchmarks import _common, torch_peers

PARTS = flags.DEFINE_list("parts", ["pggan", "ddpm", "ddpm_torch"], "What to measure.")
PGGAN_RESOLUTIONS = flags.DEFINE_list("pggan_resolutions", ["32", "128"], "Final resolutions.")
PGGAN_MODEL = flags.DEFINE_enum("pggan_model", "official", ["official", "demo32"], "PGGAN nets.")
PGGAN_BATCH = flags.DEFINE_string(
    "pggan_batch", "4:64,64:32,128:16", "Batch size per resolution: 'from_res:batch,...'."
)
DDPM_MODEL = flags.DEFINE_string("ddpm_model", "unet_cifar32", "UNet preset (ddpm part).")
DDPM_RES = flags.DEFINE_integer("ddpm_resolution", 32, "DDPM image side (px).")
DDPM_BATCH = flags.DEFINE_integer("ddpm_batch", 128, "DDPM training batch.")
SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 256, "DDIM-50 sampling batch.")
DDPM1000_BATCH = flags.DEFINE_integer("ddpm1000_batch", 64, "DDPM-1000 sampling batch.")
DDPM_SAMPLERS = flags.DEFINE_list("samplers", ["ddim50", "ddpm1000"], "Samplers to time.")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps.")
WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
JSON_OUT = flags.DEFINE_string("json_out", None, "Write the results as JSON here.")
TIMEOUT_S = flags.DEFINE_integer("timeout_s", 1800, "Per-part subprocess time limit.")
WORKER = flags.DEFINE_string("worker", None, "Internal: run one part.")

NUM_CLASSES = 2


def batch_for(resolution: int, spec: str) -> int:
    """The batch of the largest 'from_res' entry <= resolution."""
    table = sorted((int(r), int(b)) for r, b in (item.split(":") for item in spec.split(",")))
    return [b for r, b in table if r <= resolution][-1]


# ----------------------------------------------------------------------------- PGGAN
def _time_steps(step_fn, state, batch, rng) -> dict[str, float]:
    """Compile time, then seconds per step over STEPS after WARMUP (one host wait at the end)."""
    import jax

    start = time.perf_counter()
    compiled = step_fn.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    for i in range(WARMUP.value):
        state, metrics = compiled(state, batch, jax.random.fold_in(rng, i))
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(STEPS.value):
        state, metrics = compiled(state, batch, jax.random.fold_in(rng, 1000 + i))
    jax.block_until_ready((state, metrics))
    return {"compile_s": compile_s, "step_s": (time.perf_counter() - start) / STEPS.value}


def _pggan_run(max_res: int, mesh, dtype) -> dict:
    """Every resolution 4 .. max_res of one network, timed in the middle of its fade-in."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cxrjax import parallel
    from cxrjax.models import pggan
    from cxrjax.train import gan

    fade, stable = 600_000, 600_000
    if PGGAN_MODEL.value == "official":
        sizes = dict(fmap_base=8192, fmap_max=512)
    else:
        sizes = {k: v for k, v in pggan.DEMO_32.items() if k != "max_resolution"}
    common = dict(max_resolution=max_res, num_classes=NUM_CLASSES, dtype=dtype, **sizes)
    generator = pggan.Generator(**common)
    discriminator = pggan.Discriminator(mbstd_group_size=4, **common)
    optim_config = dict(lr=1e-3, b1=0.0, b2=0.99, eps=1e-8)
    txs = (gan.make_optimizer(optim_config), gan.make_optimizer(optim_config))
    init = functools.partial(gan.init_state, generator, discriminator, *txs)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    steps = gan.CompiledSteps(
        functools.partial(
            gan.make_train_step,
            generator,
            discriminator,
            txs,
            fade_images=fade,
            stable_images=stable,
        ),
        mesh,
        abstract,
    )
    replicated = parallel.replicated(mesh)
    make_state = jax.jit(init, out_shardings=jax.tree.map(lambda _: replicated, abstract))

    def count(tree):
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))

    run = {
        "max_resolution": max_res,
        "g_params": count(abstract.g_params),
        "d_params": count(abstract.d_params),
        "phases": [],
    }
    resolution = 4
    while resolution <= max_res:
        batch_size = batch_for(resolution, PGGAN_BATCH.value)
        middle = (gan.fade_start(resolution, fade, stable) if resolution > 4 else 0) + fade // 2
        # A fresh state per resolution: the timed steps donate the one they are given.
        state = make_state(jax.random.PRNGKey(0)).replace(
            images_seen=jnp.asarray(middle, jnp.int32)
        )
        rng_np = np.random.default_rng(resolution)
        batch = {
            "image": rng_np.uniform(-1, 1, (batch_size, max_res, max_res, 1)).astype(np.float32),
            "label": (np.arange(batch_size) % NUM_CLASSES).astype(np.int32),
        }
        timing = _time_steps(
            steps(resolution), state, parallel.host_to_global(batch, mesh), jax.random.PRNGKey(1)
        )
        phase = {
            "resolution": resolution,
            "batch": batch_size,
            "compile_s": round(timing["compile_s"], 2),
            "images_per_s": round(batch_size / timing["step_s"], 1),
            "ms_per_step": round(1000 * timing["step_s"], 2),
        }
        print(f"pggan R={max_res} r={resolution}: {phase}", flush=True)
        run["phases"].append(phase)
        resolution *= 2
    return run


def pggan_worker() -> dict:
    import jax.numpy as jnp

    from cxrjax import parallel

    mesh = parallel.make_mesh()
    dtype = jnp.bfloat16 if DTYPE.value == "bfloat16" else jnp.float32
    runs = [_pggan_run(r, mesh, dtype) for r in map(int, PGGAN_RESOLUTIONS.value)]
    return {
        "model": PGGAN_MODEL.value,
        "dtype": DTYPE.value,
        "runs": runs,
        "memory": _common.jax_peak_memory(),
        "environment": _common.jax_environment(),
    }


# ----------------------------------------------------------------------------- DDPM (JAX)
def ddpm_worker() -> dict:
    import jax
    import numpy as np
    import optax

    from cxrjax import diffusion, parallel
    from cxrjax.models import unet
    from cxrjax.train import diffusion as diffusion_train

    mesh = parallel.make_mesh()
    model = diffusion_train.make_model(
        dict(name=DDPM_MODEL.value, conditional=True, dtype=DTYPE.value, remat=False),
        NUM_CLASSES,
    )
    schedule = diffusion.linear_schedule(1000)
    lr = optax.constant_schedule(2e-4)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
    image_shape = (DDPM_RES.value, DDPM_RES.value, 1)
    init = functools.partial(diffusion_train.init_state, model, tx, image_shape=image_shape)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    train_step, _ = diffusion_train.compile_steps(
        model,
        tx,
        schedule,
        mesh,
        abstract,
        lr_schedule=lr,
        prediction="eps",
        label_dropout=0.1,
        ema_decay=0.9999,
        image_shape=image_shape,
        sample_steps=50,
    )
    replicated = parallel.replicated(mesh)
    state = jax.jit(init, out_shardings=jax.tree.map(lambda _: replicated, abstract))(
        jax.random.PRNGKey(0)
    )
    b = DDPM_BATCH.value
    rng_np = np.random.default_rng(0)
    batch = parallel.host_to_global(
        {
            "image": rng_np.uniform(-1, 1, (b, *image_shape)).astype(np.float32),
            "label": (np.arange(b) % NUM_CLASSES).astype(np.int32),
        },
        mesh,
    )
    timing = _common.time_jax_step(
        train_step,
        state,
        jax.random.PRNGKey(1),
        lambda: batch,
        steps=STEPS.value,
        warmup=WARMUP.value,
    )
    params = jax.jit(init)(jax.random.PRNGKey(0)).ema_params
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    out = {
        "model": DDPM_MODEL.value,
        "dtype": DTYPE.value,
        "num_params": num_params,
        "train": {
            "batch": b,
            "compile_s": round(timing["compile_s"], 2),
            "images_per_s": round(timing["steps_per_s"] * b, 1),
            "ms_per_step": round(1000 / timing["steps_per_s"], 2),
        },
        "sampling": {},
    }
    print(f"ddpm train: {out['train']} ({num_params:,} params)", flush=True)
    for name in DDPM_SAMPLERS.value:
        n = SAMPLE_BATCH.value if name == "ddim50" else DDPM1000_BATCH.value
        labels = np.arange(n) % NUM_CLASSES

        def sample(params, key, labels, name=name, n=n):
            model_fn = unet.make_model_fn(model, params)
            shape = (n, *image_shape)
            if name == "ddim50":
                return diffusion.ddim_sample(model_fn, schedule, key, shape, labels, steps=50)
            return diffusion.ddpm_sample(model_fn, schedule, key, shape, labels)

        fn = jax.jit(sample)
        start = time.perf_counter()
        compiled = fn.lower(params, jax.random.PRNGKey(0), labels).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(params, jax.random.PRNGKey(1), labels))
        start = time.perf_counter()
        images = jax.block_until_ready(compiled(params, jax.random.PRNGKey(2), labels))
        elapsed = time.perf_counter() - start
        out["sampling"][name] = {
            "batch": n,
            "compile_s": round(compile_s, 2),
            "seconds": round(elapsed, 3),
            "images_per_s": round(n / elapsed, 2),
            "finite": bool(np.isfinite(np.asarray(images)).all()),
        }
        print(f"ddpm sample {name}: {out['sampling'][name]}", flush=True)
    out["memory"] = _common.jax_peak_memory()
    out["environment"] = _common.jax_environment()
    return out


# ----------------------------------------------------------------------------- DDPM (torch)
def torch_worker() -> dict:
    import contextlib

    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    shape = torch_peers.unet_kwargs(DDPM_MODEL.value, DDPM_RES.value, NUM_CLASSES)
    model = UNet2DModel(**shape).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    bf16 = DTYPE.value == "bfloat16"
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )
    alphas_cumprod = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.to(device)
    b = DDPM_BATCH.value
    x0 = torch.rand(b, 1, DDPM_RES.value, DDPM_RES.value, device=device) * 2 - 1
    labels = torch.arange(b, device=device) % NUM_CLASSES

    def step():
        t = torch.randint(0, 1000, (b,), device=device)
        noise = torch.randn_like(x0)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with autocast:
            pred = model(xt, t, class_labels=labels).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model.train()
    for _ in range(WARMUP.value):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(STEPS.value):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start
    out = {
        "num_params": num_params,
        "dtype": DTYPE.value,
        "train": {
            "batch": b,
            "images_per_s": round(STEPS.value * b / elapsed, 1),
            "ms_per_step": round(1000 * elapsed / STEPS.value, 2),
            "final_loss": float(loss),
        },
        "sampling": {},
    }
    print(f"torch train: {out['train']} ({num_params:,} params)", flush=True)
    model.eval()
    for name in DDPM_SAMPLERS.value:
        n = SAMPLE_BATCH.value if name == "ddim50" else DDPM1000_BATCH.value
        if name == "ddim50":
            scheduler = DDIMScheduler(num_train_timesteps=1000)
            scheduler.set_timesteps(50)
        else:
            scheduler = DDPMScheduler(num_train_timesteps=1000)
            scheduler.set_timesteps(1000)
        cls = torch.arange(n, device=device) % NUM_CLASSES

        @torch.no_grad()
        def run(n=n, cls=cls, scheduler=scheduler):
            x = torch.randn(n, 1, DDPM_RES.value, DDPM_RES.value, device=device)
            for t in scheduler.timesteps:
                with autocast:
                    eps = model(x, t.to(device), class_labels=cls).sample
                x = scheduler.step(eps.float(), t, x).prev_sample
            return x

        if name == "ddim50":
            run()  # warm-up (cudnn autotune); DDPM-1000 reuses the same kernels
        sync()
        start = time.perf_counter()
        run()
        sync()
        elapsed = time.perf_counter() - start
        out["sampling"][name] = {
            "batch": n,
            "seconds": round(elapsed, 3),
            "images_per_s": round(n / elapsed, 2),
        }
        print(f"torch sample {name}: {out['sampling'][name]}", flush=True)
    if cuda:
        out["memory"] = {
            "peak_bytes": int(torch.cuda.max_memory_allocated()),
            "memory_kind": "device_peak",
        }
    else:
        out["memory"] = {"peak_bytes": _common.max_rss_bytes(), "memory_kind": "process_max_rss"}
    out["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    out["versions"] = _common.versions(("torch", "diffusers"))
    return out


WORKERS = {"pggan": pggan_worker, "ddpm": ddpm_worker, "ddpm_torch": torch_worker}


def main(argv):
    del argv
    if WORKER.value:
        _common.emit(WORKERS[WORKER.value]())
        return
    results = {"host": _common.host_environment(), "parts": {}}
    passthrough = [
        f"--{name}={flags.FLAGS[name].serialize().split('=', 1)[1]}"
        for name in (
            "pggan_resolutions",
            "pggan_model",
            "pggan_batch",
            "ddpm_model",
            "ddpm_batch",
            "sample_batch",
            "ddpm1000_batch",
            "samplers",
            "dtype",
            "steps",
            "warmup",
        )
    ]
    for part in PARTS.value:
        if part == "ddpm_torch" and importlib.util.find_spec("diffusers") is None:
            results["parts"][part] = {"error": "diffusers is not installed"}
            continue
        print(f"== {part}", flush=True)
        results["parts"][part] = _common.run_worker(
            "benchmarks.generators",
            [f"--worker={part}", *passthrough],
            env=_common.worker_env(),
            timeout_s=TIMEOUT_S.value,
        )
        if "error" in results["parts"][part]:
            print(f"{part}: {results['parts'][part]['error']}", flush=True)
    jax_train = results["parts"].get("ddpm", {}).get("train", {}).get("images_per_s")
    torch_train = results["parts"].get("ddpm_torch", {}).get("train", {}).get("images_per_s")
    if jax_train and torch_train:
        results["ddpm_train_ratio_jax_over_torch"] = round(jax_train / torch_train, 3)
        print(f"DDPM train JAX/torch = {jax_train / torch_train:.2f}", flush=True)
    if JSON_OUT.value:
        _common.write_json(JSON_OUT.value, results)


if __name__ == "__main__":
    app.run(main)
