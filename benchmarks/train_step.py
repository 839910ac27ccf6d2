r"""Training throughput of the production DenseNet classifier step, beside PyTorch eager.

    python -m benchmarks.train_step --resolutions=32,64,224 --batch_size=64 \
        --steps=20 --warmup=3 --dtype=float32 --json_out=/tmp/train_step.json

For each resolution, two subprocesses (so peak memory is theirs alone):
  JAX    `classifier.compile_steps` on `parallel.make_mesh()` (batch sharded over "data", state
         replicated and donated), model from `configs.classifier.model_config`, AdamW + cosine
         schedule from `base_config().optim`; 1-channel input, 2 classes. Compile time is
         lower + compile; images/s over `--steps` after `--warmup`, one host wait at the end.
  torch  torchvision's DenseNet of the same shape (densenet121 = DenseNet(32, (6,12,24,16), 64))
         with conv0 for 1 channel (small stem: 3x3/1 conv0 and Identity norm0/relu0/pool0, as
         ours), AdamW(1e-3, wd 1e-4), CrossEntropyLoss, `model.train()`, eager; CUDA when
         available (cudnn.benchmark, autocast bf16 with --dtype=bfloat16), else CPU with
         `torch.set_num_threads(os.cpu_count())`.
Stems follow the configs: "small" at <= 64 px, "imagenet" above (`--stem` overrides).
Peak memory: the device allocator's peak on GPU (JAX `peak_bytes_in_use`, torch
`max_memory_allocated`), process max RSS on CPU (includes the XLA compile).
Prints figures and never passes or fails on time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time

from absl import app, flags

from benchmarks import _common, torch_peers
from cxrjax.models import densenet

RESOLUTIONS = flags.DEFINE_list("resolutions", ["32", "64", "224"], "Square image sizes (px).")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Global batch size (all JAX devices).")
STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
REMAT = flags.DEFINE_bool("remat", False, "Recompute dense layers (torch: memory_efficient).")
MODEL = flags.DEFINE_enum("model", "densenet121", list(densenet.MODELS), "Model name.")
STEM = flags.DEFINE_enum("stem", "auto", ["auto", "small", "imagenet"], "auto: as the configs.")
FEED = flags.DEFINE_enum(
    "feed", "device", list(_common.FEEDS), "device: one resident batch; host: copy every step."
)
NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "JAX mesh size; 0 = every device.")
TORCH = flags.DEFINE_bool("torch", True, "Also time PyTorch (when importable).")
CHANNELS_LAST = flags.DEFINE_bool("channels_last", False, "torch channels_last memory format.")
JSON_OUT = flags.DEFINE_string("json_out", None, "Write the results as JSON here.")
TIMEOUT_S = flags.DEFINE_integer("timeout_s", 3600, "Per-measurement subprocess time limit.")
WORKER = flags.DEFINE_enum("worker", None, ["jax", "torch"], "Internal: run one measurement.")


def _stem(resolution: int) -> str:
    return _common.default_stem(resolution) if STEM.value == "auto" else STEM.value


# ----------------------------------------------------------------------------- workers
def jax_worker(resolution: int) -> dict:
    import jax

    from cxrjax import parallel

    devices = jax.devices()[: NUM_DEVICES.value or None]
    mesh = parallel.make_mesh(devices)
    parallel.check_global_batch(BATCH_SIZE.value, mesh)
    built = _common.build_jax_step(
        model_name=MODEL.value,
        resolution=resolution,
        dtype=DTYPE.value,
        remat=REMAT.value,
        stem=_stem(resolution),
        mesh=mesh,
    )
    local = _common.synthetic_batch(BATCH_SIZE.value, resolution, seed=0)
    if FEED.value == "device":
        resident = parallel.host_to_global(local, mesh)
        get_batch = lambda: resident
    else:
        get_batch = lambda: parallel.host_to_global(local, mesh)
    timing = _common.time_jax_step(
        built["train_step"],
        built["state"],
        built["rng"],
        get_batch,
        steps=STEPS.value,
        warmup=WARMUP.value,
    )
    return {
        **timing,
        **_common.jax_peak_memory(),
        "images_per_s": timing["steps_per_s"] * BATCH_SIZE.value,
        "num_params": built["num_params"],
        "mesh_devices": len(devices),
        "environment": {**_common.host_environment(), **_common.jax_environment()},
    }


def torch_worker(resolution: int) -> dict:
    import torch
    import torchvision

    torch.set_num_threads(os.cpu_count())
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes; XLA autotunes too
    torch.manual_seed(0)
    net = torch_peers.densenet_peer(
        densenet.MODELS[MODEL.value],
        stem=_stem(resolution),
        num_classes=_common.NUM_CLASSES,
        remat=REMAT.value,
    )
    num_params = sum(p.numel() for p in net.parameters())
    memory_format = torch.channels_last if CHANNELS_LAST.value else torch.contiguous_format
    net = net.to(device, memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    local = _common.synthetic_batch(BATCH_SIZE.value, resolution, seed=0)
    host_x = torch.from_numpy(local["image"]).permute(0, 3, 1, 2)  # NHWC -> NCHW view
    host_x = host_x.contiguous(memory_format=memory_format)
    host_y = torch.from_numpy(local["label"]).long()
    if cuda:
        host_x, host_y = host_x.pin_memory(), host_y.pin_memory()
    resident = (host_x.to(device), host_y.to(device))
    if DTYPE.value == "bfloat16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    def step():
        if FEED.value == "device":
            x, y = resident
        else:
            x = host_x.to(device, non_blocking=True)
            y = host_y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = time.perf_counter()
    step()
    sync()
    first_step_s = time.perf_counter() - start
    for _ in range(WARMUP.value):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(STEPS.value):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start
    if cuda:
        memory = {
            "peak_bytes": int(torch.cuda.max_memory_allocated()),
            "memory_kind": "device_peak",
        }
    else:
        memory = {"peak_bytes": _common.max_rss_bytes(), "memory_kind": "process_max_rss"}
    return {
        "first_step_s": first_step_s,
        "elapsed_s": elapsed,
        "images_per_s": STEPS.value * BATCH_SIZE.value / elapsed,
        "final_loss": float(loss),
        "num_params": int(num_params),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "num_threads": torch.get_num_threads(),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32) if cuda else None,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        **memory,
    }


# ----------------------------------------------------------------------------- driver
def worker_args(framework: str, resolution: int) -> list[str]:
    names = ("batch_size", "steps", "warmup", "dtype", "model", "stem", "feed", "num_devices")
    args = [f"--{name}={flags.FLAGS[name].value}" for name in names]
    args += ["--remat" if REMAT.value else "--noremat"]
    args += ["--channels_last" if CHANNELS_LAST.value else "--nochannels_last"]
    return [*args, f"--resolutions={resolution}", f"--worker={framework}"]


def main(argv):
    del argv
    resolutions = [int(r) for r in RESOLUTIONS.value]
    if WORKER.value:
        (resolution,) = resolutions
        run = jax_worker if WORKER.value == "jax" else torch_worker
        _common.emit(run(resolution))
        return
    with_torch = TORCH.value and importlib.util.find_spec("torch") is not None
    if TORCH.value and not with_torch:
        print("torch is not importable: JAX only")
    settings = {
        "model": MODEL.value,
        "batch_size": BATCH_SIZE.value,
        "steps": STEPS.value,
        "warmup": WARMUP.value,
        "dtype": DTYPE.value,
        "remat": REMAT.value,
        "feed": FEED.value,
        "num_devices": NUM_DEVICES.value,
        "channels_last": CHANNELS_LAST.value,
        "torch": with_torch,
    }
    print(
        f"{MODEL.value}, 1 channel, {_common.NUM_CLASSES} classes, global batch "
        f"{BATCH_SIZE.value}, {DTYPE.value}, remat={REMAT.value}, feed={FEED.value}; "
        f"{STEPS.value} timed steps after {WARMUP.value} warm-up; "
        f"{os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    env = _common.worker_env()
    rows, environment = [], {}
    for resolution in resolutions:
        row = {"resolution": resolution, "stem": _stem(resolution), "batch_size": BATCH_SIZE.value}
        for framework in ("jax", "torch") if with_torch else ("jax",):
            print(f"  {resolution} px: {framework} ...", flush=True)
            result = _common.run_worker(
                "benchmarks.train_step",
                worker_args(framework, resolution),
                env=env,
                timeout_s=TIMEOUT_S.value,
            )
            if "error" in result:
                print(f"    {framework} failed: {result['error']}", flush=True)
            environment = result.pop("environment", None) or environment
            row[framework] = result
        jax_rate = row["jax"].get("images_per_s")
        torch_rate = row.get("torch", {}).get("images_per_s")
        row["ratio_jax_over_torch"] = jax_rate / torch_rate if jax_rate and torch_rate else None
        params = {row[f].get("num_params") for f in ("jax", "torch") if f in row} - {None}
        if len(params) > 1:
            print(f"    warning: parameter counts differ: {sorted(params)}")
        rows.append(row)
    print_table(rows, environment)
    if JSON_OUT.value:
        torch_info = next((r["torch"] for r in rows if "torch_version" in r.get("torch", {})), {})
        payload = {
            "benchmark": "train_step",
            "date": environment.get("date"),
            "settings": settings,
            "environment": {
                **environment,
                "torch_version": torch_info.get("torch_version"),
                "torch_device": torch_info.get("device"),
            },
            "results": rows,
        }
        _common.write_json(JSON_OUT.value, payload)
        print(f"wrote {JSON_OUT.value}")


def print_table(rows, environment) -> None:
    versions = environment.get("versions", {})
    torch_device = next((r["torch"]["device"] for r in rows if "device" in r.get("torch", {})), "-")
    print(
        f"\nJAX {versions.get('jax')} on {environment.get('device_kind')} "
        f"({environment.get('device_count')} device(s)); torch {versions.get('torch', '-')} "
        f"on {torch_device}"
    )
    if environment.get("device_count", 1) > 1 and any(
        r["jax"].get("mesh_devices", 1) > 1 for r in rows
    ):
        print("note: JAX ran data-parallel over several devices, torch on one (--num_devices=1)")
    kinds = {r[f].get("memory_kind") for r in rows for f in ("jax", "torch") if f in r} - {None}
    memory = "device peak" if kinds == {"device_peak"} else "max RSS" if kinds else "memory"
    header = (
        f"{'res':>4} | {'stem':>8} | {'batch':>5} | {'JAX compile s':>13} | {'JAX img/s':>9} | "
        f"{'torch img/s':>11} | {'JAX/torch':>9} | {'JAX ' + memory + ' MiB':>19} | "
        f"{'torch ' + memory + ' MiB':>21}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        jax_r, torch_r = r["jax"], r.get("torch", {})
        print(
            f"{r['resolution']:>4} | {r['stem']:>8} | {r['batch_size']:>5} | "
            f"{_common.fmt(jax_r.get('compile_s'), '.1f'):>13} | "
            f"{_common.fmt(jax_r.get('images_per_s'), '.1f'):>9} | "
            f"{_common.fmt(torch_r.get('images_per_s'), '.1f'):>11} | "
            f"{_common.fmt(r['ratio_jax_over_torch'], '.2f'):>9} | "
            f"{_common.mib(jax_r.get('peak_bytes')):>19} | "
            f"{_common.mib(torch_r.get('peak_bytes')):>21}"
        )


if __name__ == "__main__":
    app.run(main)
