"""Shared pieces of the training benchmarks: the production classifier step, timing, memory.

The step is built exactly as `cxrjax.train.classifier_run.train_and_evaluate` builds it
(`make_model` from `configs.classifier.model_config`, `optim.make_optimizer` from
`base_config().optim`, `init_state`, `compile_steps` on a "data" mesh, state replicated and
donated), with synthetic batches instead of a dataset. Each measurement runs in its own
subprocess (see `run_worker`), so process max RSS and device peak memory belong to it alone
and a parent process never initialises an accelerator backend.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = "BENCH_RESULT "
NUM_CLASSES = 2  # normal vs pneumonia, as the binary configs
FEEDS = ("device", "host")


def default_stem(resolution: int) -> str:
    """What the configs use: the CIFAR-style stem up to 64 px, torchvision's above."""
    return "small" if resolution <= 64 else "imagenet"


# ----------------------------------------------------------------------------- JAX
def build_jax_step(
    *,
    model_name: str,
    resolution: int,
    dtype: str,
    remat: bool,
    stem: str,
    mesh,
    seed: int = 0,
) -> dict[str, Any]:
    """The production train step (not yet compiled), its initial state and base rng key."""
    import jax

    from configs import classifier as classifier_configs
    from cxrjax import parallel
    from cxrjax.data import sources
    from cxrjax.train import classifier, optim

    config = classifier_configs.base_config()
    config.model = classifier_configs.model_config(model_name, stem=stem, dtype=dtype, remat=remat)
    spec = sources.DatasetSpec("bench", ("normal", "pneumonia"))
    model = classifier.make_model(config.model, spec.num_classes)
    tx, schedule = optim.make_optimizer(config.optim, int(config.train.num_steps))
    loss_fn = classifier.make_loss_fn(
        spec, np.ones(spec.num_classes, np.float32), config.loss.label_smoothing
    )
    init_fn = functools.partial(
        classifier.init_state,
        model,
        tx,
        image_shape=(resolution, resolution, 1),
        use_ema=config.optim.ema_decay > 0,
    )
    rng = jax.random.PRNGKey(config.seed + seed)
    abstract = jax.eval_shape(init_fn, rng)
    train_step, _ = classifier.compile_steps(
        model,
        tx,
        loss_fn,
        schedule,
        mesh,
        abstract,
        ema_decay=config.optim.ema_decay,
        label_kind=spec.label_kind,
    )
    replicated = parallel.replicated(mesh)
    state = jax.jit(init_fn, out_shardings=replicated)(rng)
    # As the loop: a host copy of the run key, replicated (the state's own leaf is donated).
    step_rng = parallel.replicate(np.asarray(jax.device_get(state.rng)), mesh)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    return {"train_step": train_step, "state": state, "rng": step_rng, "num_params": num_params}


def synthetic_batch(local_batch_size: int, resolution: int, seed: int) -> dict[str, np.ndarray]:
    """A process-local batch as the pipeline yields it: float32 [B, H, W, 1], int32 labels."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((local_batch_size, resolution, resolution, 1), np.float32),
        "label": (np.arange(local_batch_size) % NUM_CLASSES).astype(np.int32),
    }


def time_jax_step(
    train_step,
    state,
    rng,
    get_batch: Callable[[], Any],
    *,
    steps: int,
    warmup: int,
    barrier: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Compile (lower + compile) time, then steps/s over `steps` after `warmup`.

    Like the training loop, every step gets `fold_in(rng, step)` and (with a host feed) a
    fresh host -> device batch; the host waits only once, after the last timed step.
    """
    import jax

    start = time.perf_counter()
    compiled = train_step.lower(state, get_batch(), jax.random.fold_in(rng, 0)).compile()
    compile_s = time.perf_counter() - start

    start = time.perf_counter()
    metrics = None
    for i in range(warmup):
        state, metrics = compiled(state, get_batch(), jax.random.fold_in(rng, i))
    jax.block_until_ready((state, metrics))
    warmup_s = time.perf_counter() - start
    if barrier is not None:
        barrier("benchmark_start")

    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        state, metrics = compiled(state, get_batch(), jax.random.fold_in(rng, i))
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - start
    loss = float(jax.device_get(metrics["loss"]))
    return {
        "compile_s": compile_s,
        "warmup_s": warmup_s,
        "elapsed_s": elapsed,
        "steps_per_s": steps / elapsed,
        "final_loss": loss,
    }


def jax_peak_memory() -> dict[str, Any]:
    """Device allocator peak where the backend reports one (GPU/TPU), else process max RSS."""
    import jax

    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_bytes": int(stats["peak_bytes_in_use"]), "memory_kind": "device_peak"}
    return {"peak_bytes": max_rss_bytes(), "memory_kind": "process_max_rss"}


def jax_environment() -> dict[str, Any]:
    import jax

    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
        "default_matmul_precision": jax.config.jax_default_matmul_precision,
    }


# ----------------------------------------------------------------------------- host
def max_rss_bytes() -> int:
    """This process's peak resident set (Linux reports KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib) * (1 if sys.platform == "darwin" else 1024)


def versions(names: Sequence[str] = ("jax", "jaxlib", "flax", "optax", "numpy")) -> dict:
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def host_environment() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_platforms": os.environ.get("JAX_PLATFORMS", ""),
        "versions": versions(("jax", "jaxlib", "flax", "optax", "numpy", "torch", "torchvision")),
    }


def emit(result: dict[str, Any]) -> None:
    """A worker's one machine-readable line on stdout (the parent parses the last one)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict[str, Any] | None:
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX) :]) if lines else None


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def run_worker(
    module: str, args: Sequence[str], *, env: dict[str, str], timeout_s: float
) -> dict[str, Any]:
    """Runs `python -m module args` from the repo root; its result, or an error with stderr."""
    command = [sys.executable, "-m", module, *args]
    try:
        done = subprocess.run(
            command,
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    result = parse_result(done.stdout)
    if done.returncode or result is None:
        return {"error": f"exit {done.returncode}: {tail(done.stderr)}"}
    return result


def tail(text: str, lines: int = 8) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-lines:])


def xla_flags_with_devices(num_devices: int) -> str:
    """XLA_FLAGS with the forced host device count replaced (other flags kept)."""
    kept = [
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={num_devices}"])


def write_json(path: str, payload: dict[str, Any]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")


def mib(num_bytes: int | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**20:.0f}"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
