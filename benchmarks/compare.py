r"""Every cxrjax step beside its PyTorch peer, in one process, same shapes and dtype (float32).

    python -m benchmarks.compare --json_out=benchmarks/results/compare_cpu.json
    python -m benchmarks.compare --tiny          # seconds: the CI smoke test (tests/)

Rows (ours = the production code users run; peer = PyTorch eager, `--torch_threads` threads):
  densenet121  train step at each of --resolutions: `classifier.compile_steps` (AdamW + cosine,
               state donated) vs torchvision's DenseNet of the same shape (AdamW,
               cross-entropy); small stem up to 64 px, ImageNet stem above, as the configs.
  pggan        train step at the last resolution, mid fade-in: `gan.make_train_step` as
               `gan.CompiledSteps` jits it (D: WGAN-GP + drift + AC-GAN; G; EMA) vs the PGGAN of
               `benchmarks/torch_peers.py` with the same losses, Adam(0, 0.99) and EMA.
  ddpm         train step: `diffusion.compile_steps` (eps-MSE, label dropout, clip 1, Adam, EMA)
               vs diffusers `UNet2DModel` of the same shape (`torch_peers.unet_kwargs`).
  ddim         DDIM sampling: `diffusion.ddim_sample` under one jit vs diffusers' DDIMScheduler.
  features     feature extraction: `features.extract` with a DenseNet121 `cxr:` extractor
               (uint8 28 px in, host resize to the network's size) vs torchvision's DenseNet
               `features` + pooling under `torch.no_grad`, same resize.
Ours: compile s is lower + compile; images/s over --steps after --warmup; "temp MiB" is XLA's
buffer assignment for the compiled step (activations, scratch). Peer: "first s" is the first
(untimed) call; peak MiB is the CUDA allocator's peak (not measurable per model on the CPU).
Each row's ratio is ours / peer images/s. Prints a table and never passes or fails on time.
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np
from absl import app, flags

from benchmarks import _common, torch_peers

PARTS = ("densenet", "pggan", "ddpm", "ddim", "features")
PART_LIST = flags.DEFINE_list("parts", list(PARTS), f"Rows to run, of {PARTS}.")
TINY = flags.DEFINE_bool("tiny", False, "Tiny models and sizes (the CI smoke test).")
RESOLUTIONS = flags.DEFINE_list("resolutions", ["32", "64", "224"], "DenseNet121 sizes (px).")
BATCH = flags.DEFINE_integer("batch", 32, "DenseNet and DDPM train batch.")
STEPS = flags.DEFINE_integer("steps", 4, "Timed steps (train rows).")
WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after the compile / first call.")
TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch threads; 0 = os.cpu_count().")
JSON_OUT = flags.DEFINE_string("json_out", None, "Write the rows as JSON here.")

NUM_CLASSES = torch_peers.NUM_CLASSES


def sizes() -> dict:
    """Models and shapes of this run (full or --tiny)."""
    if TINY.value:
        return dict(
            densenet=("densenet_tiny", [16], 4),
            pggan=(dict(max_resolution=8, fmap_base=32, fmap_max=8), 4),
            ddpm=("unet_tiny", 8, 4),
            ddim=("unet_tiny", 8, 2, 2),  # preset, px, batch, steps
            features=("densenet_tiny", "small", 28, 8, 4),  # model, stem, px, images, batch
        )
    from cxrjax.models import pggan

    return dict(
        densenet=("densenet121", [int(r) for r in RESOLUTIONS.value], BATCH.value),
        pggan=({**pggan.DEMO_32}, 16),
        ddpm=("unet_demo32", 32, BATCH.value),
        ddim=("unet_demo32", 32, 16, 50),
        features=("densenet121", "imagenet", 224, 64, 32),
    )


# ----------------------------------------------------------------------------- timing
def time_ours(step, state, batch, rng, images_per_step: int) -> dict:
    """Compile (lower + compile), then images/s of the compiled step (one host wait)."""
    import jax

    start = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    for i in range(WARMUP.value):
        state, metrics = compiled(state, batch, jax.random.fold_in(rng, i))
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(STEPS.value):
        state, metrics = compiled(state, batch, jax.random.fold_in(rng, 100 + i))
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - start
    return {
        "compile_s": compile_s,
        "images_per_s": STEPS.value * images_per_step / elapsed,
        "temp_bytes": _temp_bytes(compiled),
    }


def _temp_bytes(compiled) -> int | None:
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def time_peer(step_fn, images_per_step: int, steps: int | None = None) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step_fn()
    sync()
    first_s = time.perf_counter() - start
    for _ in range(WARMUP.value):
        step_fn()
    sync()
    steps = STEPS.value if steps is None else steps
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    sync()
    elapsed = time.perf_counter() - start
    return {
        "first_s": first_s,
        "images_per_s": steps * images_per_step / elapsed,
        "peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
    }


def torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- rows
def densenet_rows(mesh) -> list[dict]:
    import torch

    from cxrjax import parallel
    from cxrjax.models import densenet

    name, resolutions, batch_size = sizes()["densenet"]
    rows = []
    for res in resolutions:
        stem = _common.default_stem(res)
        built = _common.build_jax_step(
            model_name=name, resolution=res, dtype="float32", remat=False, stem=stem, mesh=mesh
        )
        local = _common.synthetic_batch(batch_size, res, seed=0)
        ours = time_ours(
            built["train_step"],
            built["state"],
            parallel.host_to_global(local, mesh),
            built["rng"],
            batch_size,
        )
        device = torch_device()
        torch.manual_seed(0)
        net = torch_peers.densenet_peer(densenet.MODELS[name], stem=stem, num_classes=NUM_CLASSES)
        net = net.to(device).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
        x = torch.from_numpy(local["image"]).permute(0, 3, 1, 2).contiguous().to(device)
        y = torch.from_numpy(local["label"]).long().to(device)

        def step(net=net, opt=opt, x=x, y=y):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

        peer = time_peer(step, batch_size)
        rows.append(row(name, f"train step, {stem} stem", f"{res}x{res}x1", batch_size, ours, peer))
    return rows


def pggan_rows(mesh) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch

    from cxrjax import parallel
    from cxrjax.models import pggan
    from cxrjax.train import gan

    sizes_kw, batch_size = sizes()["pggan"]
    res = sizes_kw["max_resolution"]
    common = dict(num_classes=NUM_CLASSES, **sizes_kw)
    generator = pggan.Generator(**common)
    discriminator = pggan.Discriminator(mbstd_group_size=4, **common)
    optim_config = dict(lr=1e-3, b1=0.0, b2=0.99, eps=1e-8)
    txs = (gan.make_optimizer(optim_config), gan.make_optimizer(optim_config))
    init = functools.partial(gan.init_state, generator, discriminator, *txs)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    fade = stable = 600_000
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
    middle = gan.fade_start(res, fade, stable) + fade // 2  # alpha = 0.5
    replicated = parallel.replicated(mesh)
    state = jax.jit(init, out_shardings=jax.tree.map(lambda _: replicated, abstract))(
        jax.random.PRNGKey(0)
    ).replace(images_seen=jnp.asarray(middle, jnp.int32))
    rng_np = np.random.default_rng(0)
    local = {
        "image": rng_np.uniform(-1, 1, (batch_size, res, res, 1)).astype(np.float32),
        "label": (np.arange(batch_size) % NUM_CLASSES).astype(np.int32),
    }
    batch = parallel.host_to_global(local, mesh)
    ours = time_ours(steps(res), state, batch, jax.random.PRNGKey(1), batch_size)

    device = torch_device()
    torch.manual_seed(0)
    g, d = (m.to(device) for m in torch_peers.pggan_peer(**common))
    g_ema = torch_peers.pggan_peer(**common)[0].to(device)
    g_ema.load_state_dict(g.state_dict())
    g_opt = torch.optim.Adam(g.parameters(), lr=1e-3, betas=(0.0, 0.99), eps=1e-8)
    d_opt = torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.0, 0.99), eps=1e-8)
    reals = torch.from_numpy(local["image"]).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.from_numpy(local["label"]).long().to(device)
    latent = generator.latent_dim
    ce = torch.nn.functional.cross_entropy

    def step():
        # D: WGAN-GP (lambda 10) + drift 1e-3 + AC-GAN on reals and fakes.
        with torch.no_grad():
            fakes = g(torch.randn(batch_size, latent, device=device), labels, res, 0.5)
        real_s, real_c = d(reals, labels, res, 0.5)
        fake_s, fake_c = d(fakes, labels, res, 0.5)
        eps = torch.rand(batch_size, 1, 1, 1, device=device)
        mixed = (eps * reals + (1 - eps) * fakes).requires_grad_(True)
        (grad,) = torch.autograd.grad(d(mixed, labels, res, 0.5)[0].sum(), mixed, create_graph=True)
        penalty = (grad.flatten(1).norm(dim=1) - 1) ** 2
        d_loss = (fake_s - real_s + 10 * penalty + 1e-3 * real_s**2).mean()
        d_loss = d_loss + ce(real_c, labels) + ce(fake_c, labels)
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()
        # G: WGAN + AC-GAN; then the EMA of G.
        fake_s, fake_c = d(g(torch.randn(batch_size, latent, device=device), labels, res, 0.5),
                           labels, res, 0.5)  # fmt: skip
        g_loss = -fake_s.mean() + ce(fake_c, labels)
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
        with torch.no_grad():
            for pe, p in zip(g_ema.parameters(), g.parameters(), strict=True):
                pe.lerp_(p, 1 - 0.999)

    peer = time_peer(step, batch_size)
    return [row("pggan", "train step (G + D), mid fade", f"{res}x{res}x1", batch_size, ours, peer)]


def _ddpm_setup(preset: str, res: int, mesh):
    import jax
    import optax

    from cxrjax import diffusion
    from cxrjax.train import diffusion as diffusion_train

    model = diffusion_train.make_model(
        dict(name=preset, conditional=True, dtype="float32", remat=False), NUM_CLASSES
    )
    schedule = diffusion.linear_schedule(1000)
    lr = optax.constant_schedule(2e-4)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
    image_shape = (res, res, 1)
    init = functools.partial(diffusion_train.init_state, model, tx, image_shape=image_shape)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    return model, schedule, lr, tx, image_shape, init, abstract


def ddpm_rows(mesh) -> list[dict]:
    import jax
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from cxrjax import parallel
    from cxrjax.train import diffusion as diffusion_train

    preset, res, batch_size = sizes()["ddpm"]
    model, schedule, lr, tx, image_shape, init, abstract = _ddpm_setup(preset, res, mesh)
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
        sample_steps=2,
    )
    replicated = parallel.replicated(mesh)
    state = jax.jit(init, out_shardings=jax.tree.map(lambda _: replicated, abstract))(
        jax.random.PRNGKey(0)
    )
    rng_np = np.random.default_rng(0)
    local = {
        "image": rng_np.uniform(-1, 1, (batch_size, *image_shape)).astype(np.float32),
        "label": (np.arange(batch_size) % NUM_CLASSES).astype(np.int32),
    }
    ours = time_ours(
        train_step,
        state,
        parallel.host_to_global(local, mesh),
        jax.random.PRNGKey(1),
        batch_size,
    )

    device = torch_device()
    torch.manual_seed(0)
    net = UNet2DModel(**torch_peers.unet_kwargs(preset, res)).to(device).train()
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    abar = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.to(device)
    x0 = torch.from_numpy(local["image"]).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.from_numpy(local["label"]).long().to(device)

    def step():
        t = torch.randint(0, 1000, (batch_size,), device=device)
        noise = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        drop = torch.rand(batch_size, device=device) < 0.1  # label dropout: the null class
        cls = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)
        pred = net(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, class_labels=cls).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for k, v in net.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].lerp_(v, 1 - 0.9999)

    peer = time_peer(step, batch_size)
    return [row(preset, "DDPM train step", f"{res}x{res}x1", batch_size, ours, peer)]


def ddim_rows(mesh) -> list[dict]:
    import jax
    import torch
    from diffusers import DDIMScheduler, UNet2DModel

    from cxrjax import diffusion, parallel
    from cxrjax.models import unet

    preset, res, n, num_steps = sizes()["ddim"]
    model, schedule, _, _, image_shape, init, _ = _ddpm_setup(preset, res, mesh)
    params = jax.jit(init)(jax.random.PRNGKey(0)).ema_params
    labels = np.arange(n) % NUM_CLASSES

    def sample(params, key, labels):
        model_fn = unet.make_model_fn(model, params)
        shape = (n, *image_shape)
        return diffusion.ddim_sample(model_fn, schedule, key, shape, labels, steps=num_steps)

    start = time.perf_counter()
    # The compiler options the production samplers use (cxrjax.synthesis: YNN fusions off on CPU).
    jitted = jax.jit(sample, compiler_options=parallel.cpu_compiler_options())
    compiled = jitted.lower(params, jax.random.PRNGKey(0), labels).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params, jax.random.PRNGKey(1), labels))
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, jax.random.PRNGKey(2), labels))
    ours = {
        "compile_s": compile_s,
        "images_per_s": n / (time.perf_counter() - start),
        "temp_bytes": _temp_bytes(compiled),
    }

    device = torch_device()
    torch.manual_seed(0)
    net = UNet2DModel(**torch_peers.unet_kwargs(preset, res)).to(device).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(num_steps)
    cls = torch.from_numpy(labels).long().to(device)

    @torch.no_grad()
    def run():
        x = torch.randn(n, 1, res, res, device=device)
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t.to(device), class_labels=cls).sample, t, x).prev_sample
        return x

    peer = time_peer(run, n, steps=1)
    return [row(preset, f"DDIM-{num_steps} sampling", f"{res}x{res}x1", n, ours, peer)]


def features_rows(mesh) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch

    from configs import classifier as classifier_configs
    from cxrjax import features
    from cxrjax.models import densenet
    from cxrjax.train import classifier

    name, stem, res, num_images, batch_size = sizes()["features"]
    model = classifier.make_model(classifier_configs.model_config(name, stem=stem), NUM_CLASSES)
    variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, res, res, 1)), train=False))(
        jax.random.PRNGKey(0)
    )
    extractor = features.classifier_extractor(
        model,
        variables,
        mean=0.5,
        std=0.25,
        resolution=res,
        spec=f"cxr:<random {name}>",
        fingerprint=f"random-{name}-{res}",
    )
    images = np.random.default_rng(0).integers(0, 256, (num_images, 28, 28), np.uint8)
    start = time.perf_counter()
    features.extract(extractor, images[:batch_size], batch_size=batch_size, mesh=mesh)
    compile_s = time.perf_counter() - start  # the first batch: trace + compile + run
    start = time.perf_counter()
    features.extract(extractor, images, batch_size=batch_size, mesh=mesh)
    ours = {
        "compile_s": compile_s,
        "images_per_s": num_images / (time.perf_counter() - start),
        "temp_bytes": None,
    }

    device = torch_device()
    torch.manual_seed(0)
    net = torch_peers.densenet_peer(densenet.MODELS[name], stem=stem, num_classes=NUM_CLASSES)
    net = net.to(device).eval()
    host = torch.from_numpy(images).float().div(255.0)[:, None]

    @torch.no_grad()
    def run():
        for i in range(0, num_images, batch_size):
            x = host[i : i + batch_size].to(device)
            if res != x.shape[-1]:
                x = torch.nn.functional.interpolate(
                    x, size=(res, res), mode="bilinear", antialias=True
                )
            x = (x - 0.5) / 0.25
            y = torch.relu(net.features(x))
            y = torch.nn.functional.adaptive_avg_pool2d(y, 1).flatten(1).cpu()
        return y

    peer = time_peer(run, num_images, steps=1)
    return [row(name, f"feature extraction, {stem} stem", f"{res}x{res}x1", batch_size, ours, peer)]


def row(model: str, what: str, shape: str, batch: int, ours: dict, peer: dict) -> dict:
    ratio = ours["images_per_s"] / peer["images_per_s"]
    out = {"model": model, "what": what, "shape": shape, "batch": batch, "ratio": ratio}
    out.update({f"ours_{k}": v for k, v in ours.items()})
    out.update({f"peer_{k}": v for k, v in peer.items()})
    print(f"  {model} {what} {shape} batch {batch}: ours/peer = {ratio:.2f}", flush=True)
    return out


ROWS = {
    "densenet": densenet_rows,
    "pggan": pggan_rows,
    "ddpm": ddpm_rows,
    "ddim": ddim_rows,
    "features": features_rows,
}


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'model':<14} | {'what':<32} | {'shape':>9} | {'batch':>5} | {'ours img/s':>10} | "
        f"{'peer img/s':>10} | {'ours/peer':>9} | {'compile s':>9} | {'peer first s':>12} | "
        f"{'ours temp MiB':>13} | {'peer peak MiB':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<14} | {r['what']:<32} | {r['shape']:>9} | {r['batch']:>5} | "
            f"{r['ours_images_per_s']:>10.2f} | {r['peer_images_per_s']:>10.2f} | "
            f"{r['ratio']:>9.2f} | {r['ours_compile_s']:>9.1f} | {r['peer_first_s']:>12.1f} | "
            f"{_common.mib(r['ours_temp_bytes']):>13} | {_common.mib(r['peer_peak_bytes']):>13}"
        )


def main(argv):
    del argv
    import jax
    import torch

    from cxrjax import parallel

    unknown = set(PART_LIST.value) - set(PARTS)
    if unknown:
        raise app.UsageError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    threads = TORCH_THREADS.value or os.cpu_count() or 1
    torch.set_num_threads(threads)
    mesh = parallel.make_mesh(jax.devices()[:1])  # one device for both frameworks
    environment = {
        **_common.host_environment(),
        **_common.jax_environment(),
        "torch_threads": torch.get_num_threads(),
        "torch_device": str(torch_device()),
        "jax_compiler_options": parallel.cpu_compiler_options(),
        "versions": _common.versions(
            ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "torchvision", "diffusers")
        ),
    }
    print(
        f"compare ({'tiny' if TINY.value else 'full'}): JAX {jax.__version__} on "
        f"{jax.devices()[0].device_kind}, torch {torch.__version__} on {torch_device()} "
        f"({threads} threads); float32; {STEPS.value} timed steps after {WARMUP.value} warm-up; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows = []
    for part in PART_LIST.value:
        print(f"== {part}", flush=True)
        rows += ROWS[part](mesh)
    print()
    print_table(rows)
    if JSON_OUT.value:
        settings = {
            "tiny": TINY.value,
            "parts": list(PART_LIST.value),
            "steps": STEPS.value,
            "warmup": WARMUP.value,
            "dtype": "float32",
        }
        payload = {
            "benchmark": "compare",
            "date": environment["date"],
            "settings": settings,
            "environment": environment,
            "rows": rows,
        }
        _common.write_json(JSON_OUT.value, payload)
        print(f"wrote {JSON_OUT.value}")


if __name__ == "__main__":
    app.run(main)
