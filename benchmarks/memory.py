r"""Memory and speed effect of bf16 compute and rematerialisation on the production train steps.

    python -m benchmarks.memory --json_out=benchmarks/results/memory_cpu.json

For each model and each variant (fp32 / bf16 compute with fp32 params, remat off / on where the
model has it), one subprocess builds the step exactly as its trainer does and reports:
  temp MiB        XLA's buffer assignment for the compiled step (`memory_analysis()`:
                  temp_size_in_bytes): activations and scratch, what remat and bf16 change;
  args MiB        argument buffers (state + batch; params and optimizer stay fp32);
  peak MiB        the device allocator's peak on GPU, else the process max RSS (which includes
                  the Python/JAX baseline and the compile);
  compile s, img/s  lower + compile time; images/s over `--steps` after `--warmup`.
Models (one device, `--batch_size` examples):
  classifier  `classifier.compile_steps`, DenseNet `--classifier_model` at `--classifier_res`
              (the pneumonia_mnist preset's densenet121_k12 at 28 px by default);
  unet        `diffusion.compile_steps`, `--unet_model` at `--unet_res` (unet_demo32 at 32 px);
  pggan       `gan.make_train_step` at `--pggan_res` (Demo32 G and D, the last stage), with the
              models' own `dtype` field (no remat option in PGGAN).
Prints figures and never passes or fails on time. On a 2-core CPU expect a few minutes.
"""

from __future__ import annotations

import functools
import os
import time

from absl import app, flags

from benchmarks import _common

MODELS = flags.DEFINE_list("models", ["classifier", "unet", "pggan"], "Which steps to measure.")
ONLY = flags.DEFINE_list(
    "variants", [], "Subset of dtype:remat pairs, e.g. float32:0,bfloat16:1 (default: all)."
)
BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Batch size (one device).")
STEPS = flags.DEFINE_integer("steps", 3, "Timed steps.")
WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
CLASSIFIER_MODEL = flags.DEFINE_string("classifier_model", "densenet121_k12", "DenseNet name.")
CLASSIFIER_RES = flags.DEFINE_integer("classifier_res", 28, "Classifier resolution (px).")
UNET_MODEL = flags.DEFINE_string("unet_model", "unet_demo32", "UNet preset.")
UNET_RES = flags.DEFINE_integer("unet_res", 32, "UNet resolution (px).")
PGGAN_RES = flags.DEFINE_integer("pggan_res", 32, "PGGAN stage (px, power of two).")
JSON_OUT = flags.DEFINE_string("json_out", None, "Write the results as JSON here.")
TIMEOUT_S = flags.DEFINE_integer("timeout_s", 1800, "Per-measurement subprocess time limit.")
# Internal: one measurement in this process (set by the driver).
WORKER = flags.DEFINE_string("worker", None, "Internal: model to measure.")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Internal: compute dtype.")
REMAT = flags.DEFINE_bool("remat", False, "Internal: rematerialise.")

VARIANTS = {
    "classifier": [("float32", False), ("bfloat16", False), ("float32", True), ("bfloat16", True)],
    "unet": [("float32", False), ("bfloat16", False), ("float32", True), ("bfloat16", True)],
    "pggan": [("float32", False), ("bfloat16", False)],
}


# ----------------------------------------------------------------------------- builders
def build_classifier(mesh):
    built = _common.build_jax_step(
        model_name=CLASSIFIER_MODEL.value,
        resolution=CLASSIFIER_RES.value,
        dtype=DTYPE.value,
        remat=REMAT.value,
        stem=_common.default_stem(CLASSIFIER_RES.value),
        mesh=mesh,
    )
    batch = _common.synthetic_batch(BATCH_SIZE.value, CLASSIFIER_RES.value, seed=0)
    return built["train_step"], built["state"], built["rng"], batch, built["num_params"]


def build_unet(mesh):
    import jax
    import numpy as np

    from configs import ddpm as ddpm_configs
    from cxrjax import parallel
    from cxrjax.train import diffusion, optim

    config = ddpm_configs.base_config()
    config.model.update(name=UNET_MODEL.value, dtype=DTYPE.value, remat=REMAT.value)
    model = diffusion.make_model(config.model, 2)
    tx, lr_schedule = optim.make_optimizer(config.optim, int(config.train.num_steps))
    shape = (UNET_RES.value, UNET_RES.value, 1)
    init_fn = functools.partial(diffusion.init_state, model, tx, image_shape=shape)
    rng = jax.random.PRNGKey(0)
    abstract = jax.eval_shape(init_fn, rng)
    train_step, _ = diffusion.compile_steps(
        model,
        tx,
        diffusion.make_noise_schedule(config.diffusion),
        mesh,
        abstract,
        lr_schedule=lr_schedule,
        prediction=config.diffusion.prediction,
        label_dropout=float(config.diffusion.label_dropout),
        ema_decay=float(config.optim.ema_decay),
        image_shape=shape,
        sample_steps=2,
    )
    state = jax.jit(init_fn, out_shardings=parallel.replicated(mesh))(rng)
    batch = _common.synthetic_batch(BATCH_SIZE.value, UNET_RES.value, seed=0)
    step_rng = parallel.replicate(np.asarray(jax.device_get(state.rng)), mesh)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    return train_step, state, step_rng, batch, num_params


def build_pggan(mesh):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs import pggan as pggan_configs
    from cxrjax import parallel
    from cxrjax.models import pggan
    from cxrjax.train import gan, gan_run

    if REMAT.value:
        raise ValueError("PGGAN has no remat option")
    config = pggan_configs.get_config("pneumonia_mnist")
    dtype = jnp.bfloat16 if DTYPE.value == "bfloat16" else jnp.float32
    res = PGGAN_RES.value
    generator = pggan.GeneratorDemo32(max_resolution=res, num_classes=2, dtype=dtype)
    discriminator = pggan.DiscriminatorDemo32(
        max_resolution=res,
        num_classes=2,
        mbstd_group_size=config.model.mbstd_group_size,
        dtype=dtype,
    )
    tx = gan.make_optimizer(config.optim)
    init_fn = functools.partial(gan.init_state, generator, discriminator, tx, tx)
    rng = jax.random.PRNGKey(0)
    abstract = jax.eval_shape(init_fn, rng)
    steps = gan.CompiledSteps(
        gan_run.step_factory(config, generator, discriminator, (tx, tx)),
        mesh,
        abstract,
    )
    state = jax.jit(init_fn, out_shardings=parallel.replicated(mesh))(rng)
    batch = _common.synthetic_batch(BATCH_SIZE.value, res, seed=0)
    batch["image"] = np.tanh(batch["image"])  # reals in [-1, 1]
    step_rng = parallel.replicate(np.asarray(jax.random.PRNGKey(1)), mesh)
    num_params = sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves((abstract.g_params, abstract.d_params))
    )
    step = steps(res)

    # The timing helper reads metrics["loss"]: report the critic's loss under that name.
    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, batch, rng):
        state, metrics = step(state, batch, rng)
        return state, {**metrics, "loss": metrics["d/d_loss"]}

    return train_step, state, step_rng, batch, num_params


BUILDERS = {"classifier": build_classifier, "unet": build_unet, "pggan": build_pggan}


# ----------------------------------------------------------------------------- worker
def worker(name: str) -> dict:
    import jax

    from cxrjax import parallel

    mesh = parallel.make_mesh(jax.devices()[:1])
    train_step, state, rng, batch, num_params = BUILDERS[name](mesh)
    resident = parallel.host_to_global(batch, mesh)
    start = time.perf_counter()
    analysis = train_step.lower(state, resident, rng).compile().memory_analysis()
    compile_s = time.perf_counter() - start  # the timing helper's own compile is a cache hit
    memory = {}
    if analysis is not None:
        for key in ("temp", "argument", "output", "alias", "generated_code"):
            memory[f"{key}_bytes"] = int(getattr(analysis, f"{key}_size_in_bytes", 0) or 0)
    timing = _common.time_jax_step(
        train_step, state, rng, lambda: resident, steps=STEPS.value, warmup=WARMUP.value
    )
    return {
        **timing,
        "compile_s": compile_s,
        **memory,
        **_common.jax_peak_memory(),
        "images_per_s": timing["steps_per_s"] * BATCH_SIZE.value,
        "num_params": num_params,
        "environment": {**_common.host_environment(), **_common.jax_environment()},
    }


# ----------------------------------------------------------------------------- driver
def run_variant(name: str, dtype: str, remat: bool) -> dict:
    args = [
        f"--worker={name}",
        f"--dtype={dtype}",
        "--remat" if remat else "--noremat",
        *(
            f"--{flag}={flags.FLAGS[flag].value}"
            for flag in (
                "batch_size", "steps", "warmup", "classifier_model", "classifier_res",
                "unet_model", "unet_res", "pggan_res",
            )
        ),
    ]  # fmt: skip
    env = _common.worker_env({"XLA_FLAGS": _common.xla_flags_with_devices(1)})
    result = _common.run_worker("benchmarks.memory", args, env=env, timeout_s=TIMEOUT_S.value)
    return {"model": name, "dtype": dtype, "remat": remat, **result}


def describe(name: str) -> str:
    return {
        "classifier": f"{CLASSIFIER_MODEL.value} @ {CLASSIFIER_RES.value} px",
        "unet": f"{UNET_MODEL.value} @ {UNET_RES.value} px",
        "pggan": f"Demo32 G+D @ {PGGAN_RES.value} px",
    }[name]


def print_table(results) -> None:
    header = (
        f"{'model':<28} | {'dtype':<8} | {'remat':<5} | {'temp MiB':>8} | {'args MiB':>8} | "
        f"{'peak MiB':>8} | {'compile s':>9} | {'img/s':>7} | {'vs fp32':>7}"
    )
    print()
    print(header)
    print("-" * len(header))
    base: dict[str, dict] = {}
    for r in results:
        if "error" in r:
            name = describe(r["model"])
            print(f"{name:<28} | {r['dtype']:<8} | {r['remat']!s:<5} | {r['error']}")
            continue
        if r["dtype"] == "float32" and not r["remat"]:
            base[r["model"]] = r
        reference = base.get(r["model"], {}).get("images_per_s")
        relative = r["images_per_s"] / reference if reference else None
        print(
            f"{describe(r['model']):<28} | {r['dtype']:<8} | {r['remat']!s:<5} | "
            f"{_common.mib(r.get('temp_bytes')):>8} | {_common.mib(r.get('argument_bytes')):>8} | "
            f"{_common.mib(r.get('peak_bytes')):>8} | {r['compile_s']:>9.1f} | "
            f"{r['images_per_s']:>7.1f} | {_common.fmt(relative, '.2f'):>7}"
        )


def main(argv):
    del argv
    if WORKER.value:
        _common.emit(worker(WORKER.value))
        return
    print(
        f"batch {BATCH_SIZE.value}, 1 device, {STEPS.value} timed steps after {WARMUP.value} "
        f"warm-up; {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    wanted = {(v.split(":")[0], v.split(":")[1] in ("1", "true", "True")) for v in ONLY.value}
    results = []
    for name in MODELS.value:
        for dtype, remat in VARIANTS[name]:
            if wanted and (dtype, remat) not in wanted:
                continue
            print(f"  {describe(name)} {dtype} remat={remat} ...", flush=True)
            results.append(run_variant(name, dtype, remat))
            write(results)  # after each variant: a run cut short keeps what it measured
    print_table(results)
    if JSON_OUT.value:
        print(f"wrote {JSON_OUT.value}")


def write(results) -> None:
    if JSON_OUT.value:
        environment = next((r.get("environment") for r in results if "error" not in r), {})
        payload = {
            "benchmark": "memory",
            "date": environment.get("date"),
            "settings": {
                name: flags.FLAGS[name].value
                for name in (
                    "batch_size",
                    "steps",
                    "warmup",
                    "classifier_model",
                    "classifier_res",
                    "unet_model",
                    "unet_res",
                    "pggan_res",
                )
            },  # fmt: skip
            "environment": environment,
            "results": results,
        }
        _common.write_json(JSON_OUT.value, payload)


if __name__ == "__main__":
    app.run(main)
