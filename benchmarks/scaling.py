r"""Data-parallel overhead of the classifier train step on forced CPU devices and processes.

    python -m benchmarks.scaling --model=densenet_tiny --resolution=28 --batch_size=64 \
        --devices=1,2,4 --processes=2 --devices_per_process=2 --json_out=/tmp/scaling.json

Same global batch everywhere; one subprocess per setting, with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` and `JAX_PLATFORMS=cpu` set before JAX is
imported:
  1, 2, 4 devices      one process, mesh over N CPU devices;
  2 processes x 2      two processes on localhost joined by `jax.distributed` (gloo CPU
                       collectives), each feeding its process-local half of the batch.
The step is the production one (`classifier.compile_steps`: batch sharded over "data", state
replicated and donated, gradient all-reduce inserted by XLA). With `--feed=host` (default), as
in the training loop, every step assembles the batch with `parallel.host_to_global`; with
`--feed=device` one resident batch is reused, leaving only compute and collectives.
Forced CPU devices share the host's cores, so more devices cannot add compute: the figures show
what the data-parallel path costs, not a speed-up. Prints figures; never passes or fails on time.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import _common
from cxrjax.models import densenet

MODEL = flags.DEFINE_enum("model", "densenet_tiny", list(densenet.MODELS), "Model name.")
RESOLUTION = flags.DEFINE_integer("resolution", 28, "Square image size (px).")
STEM = flags.DEFINE_enum("stem", "auto", ["auto", "small", "imagenet"], "auto: as the configs.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Global batch size, the same in every setting.")
STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
REMAT = flags.DEFINE_bool("remat", False, "Recompute dense layers in the backward pass.")
FEED = flags.DEFINE_enum(
    "feed", "host", list(_common.FEEDS), "host: host_to_global every step; device: one batch."
)
DEVICES = flags.DEFINE_list("devices", ["1", "2", "4"], "Single-process device counts.")
PROCESSES = flags.DEFINE_integer("processes", 2, "Localhost processes; < 2 skips it.")
DEVICES_PER_PROCESS = flags.DEFINE_integer("devices_per_process", 2, "Devices per process.")
JSON_OUT = flags.DEFINE_string("json_out", None, "Write the results as JSON here.")
TIMEOUT_S = flags.DEFINE_integer("timeout_s", 1800, "Per-setting subprocess time limit.")
# Internal: one measurement in this process (set by the driver).
WORKER = flags.DEFINE_bool("worker", False, "Internal: run one measurement.")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Internal: host:port of process 0.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Internal: processes in this run.")
PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Internal: this process's index.")


def _stem() -> str:
    return _common.default_stem(RESOLUTION.value) if STEM.value == "auto" else STEM.value


def initialize_distributed() -> None:
    """Joins the multi-process run (gloo CPU collectives) before any backend is created."""
    from cxrjax import parallel

    parallel.initialize(
        coordinator_address=COORDINATOR.value,
        num_processes=NUM_PROCESSES.value,
        process_id=PROCESS_ID.value,
    )


def worker() -> dict:
    if NUM_PROCESSES.value > 1:
        initialize_distributed()
    import jax

    from cxrjax import parallel

    mesh = parallel.make_mesh()
    parallel.check_global_batch(BATCH_SIZE.value, mesh)
    built = _common.build_jax_step(
        model_name=MODEL.value,
        resolution=RESOLUTION.value,
        dtype=DTYPE.value,
        remat=REMAT.value,
        stem=_stem(),
        mesh=mesh,
    )
    local_size = parallel.local_batch_size(BATCH_SIZE.value)
    # Each process feeds only its own rows of one global batch, so every setting computes the
    # same step and ends at the same loss (a cross-check printed with the table).
    rows = slice(jax.process_index() * local_size, (jax.process_index() + 1) * local_size)
    global_batch = _common.synthetic_batch(BATCH_SIZE.value, RESOLUTION.value, seed=0)
    local = {key: value[rows] for key, value in global_batch.items()}
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
        barrier=parallel.sync,
    )
    return {
        **timing,
        **_common.jax_peak_memory(),
        "images_per_s": timing["steps_per_s"] * BATCH_SIZE.value,
        "process_index": jax.process_index(),
        "local_batch_size": local_size,
        "per_device_batch_size": BATCH_SIZE.value // jax.device_count(),
        "num_params": built["num_params"],
        "environment": {**_common.host_environment(), **_common.jax_environment()},
    }


# ----------------------------------------------------------------------------- driver
def worker_args() -> list[str]:
    names = ("model", "resolution", "stem", "batch_size", "steps", "warmup", "dtype", "feed")
    args = [f"--{name}={flags.FLAGS[name].value}" for name in names]
    return [*args, "--remat" if REMAT.value else "--noremat", "--worker"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_single(num_devices: int) -> dict:
    env = _common.worker_env(
        {"XLA_FLAGS": _common.xla_flags_with_devices(num_devices), "JAX_PLATFORMS": "cpu"}
    )
    result = _common.run_worker(
        "benchmarks.scaling", worker_args(), env=env, timeout_s=TIMEOUT_S.value
    )
    return {"processes": 1, "devices_per_process": num_devices, "per_process": [result]}


def run_multi(num_processes: int, devices_per_process: int) -> dict:
    env = _common.worker_env(
        {
            "XLA_FLAGS": _common.xla_flags_with_devices(devices_per_process),
            "JAX_PLATFORMS": "cpu",
        }
    )
    address = f"localhost:{free_port()}"
    common_args = [*worker_args(), f"--coordinator_address={address}"]
    common_args.append(f"--num_processes={num_processes}")
    # Output to files, not pipes: the parent polls, so a crashed process ends the others
    # instead of leaving them waiting for their peer until the distributed timeout.
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        procs, files = [], []
        for i in range(num_processes):
            out, err = (
                stack.enter_context(open(os.path.join(tmp, f"{i}.{kind}"), "w+", encoding="utf-8"))
                for kind in ("out", "err")
            )
            files.append((out, err))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.scaling", *common_args, f"--process_id={i}"],
                    cwd=_common.REPO_ROOT,
                    env=env,
                    stdout=out,
                    stderr=err,
                    text=True,
                )
            )
        deadline = time.monotonic() + TIMEOUT_S.value
        timed_out, killed = False, set()
        while any(p.poll() is None for p in procs):
            failed = any(p.poll() not in (None, 0) for p in procs)
            timed_out = time.monotonic() > deadline
            if failed or timed_out:
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                        killed.add(i)
                break
            time.sleep(0.2)
        results = []
        for i, (proc, (out, err)) in enumerate(zip(procs, files, strict=True)):
            out.seek(0)
            err.seek(0)
            result = _common.parse_result(out.read())
            if i in killed:
                why = f"timed out after {TIMEOUT_S.value} s" if timed_out else "a peer failed"
                result = {"error": f"killed: {why}", "killed": True}
            elif proc.returncode or result is None:
                result = {"error": f"exit {proc.returncode}: {_common.tail(err.read())}"}
            results.append(result)
    return {
        "processes": num_processes,
        "devices_per_process": devices_per_process,
        "coordinator_address": address,
        "per_process": results,
    }


def summarise(setting: dict) -> dict:
    """Process 0's figures stand for the run; processes advance in lockstep (collectives)."""
    results = setting["per_process"]
    # The cause first: a process that failed on its own, not one killed after it.
    errors = sorted((r.get("killed", False), r["error"]) for r in results if "error" in r)
    setting["devices"] = setting["processes"] * setting["devices_per_process"]
    if errors:
        setting["error"] = errors[0][1]
        return setting
    first = results[0]
    for key in ("compile_s", "images_per_s", "per_device_batch_size", "peak_bytes"):
        setting[key] = first[key]
    setting["images_per_s_min_over_processes"] = min(r["images_per_s"] for r in results)
    setting["final_loss"] = [r["final_loss"] for r in results]
    return setting


def main(argv):
    del argv
    if WORKER.value:
        _common.emit(worker())
        return
    counts = [int(n) for n in DEVICES.value]
    print(
        f"{MODEL.value} at {RESOLUTION.value} px ({_stem()} stem), global batch "
        f"{BATCH_SIZE.value}, {DTYPE.value}, feed={FEED.value}; {STEPS.value} timed steps after "
        f"{WARMUP.value} warm-up; {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    settings = []
    for n in counts:
        print(f"  1 process x {n} device(s) ...", flush=True)
        settings.append(summarise(run_single(n)))
    if PROCESSES.value > 1:
        print(f"  {PROCESSES.value} processes x {DEVICES_PER_PROCESS.value} device(s) ...")
        settings.append(summarise(run_multi(PROCESSES.value, DEVICES_PER_PROCESS.value)))
    for s in settings:
        if "error" in s:
            print(f"  {s['processes']} x {s['devices_per_process']} failed: {s['error']}")
    print_table(settings)
    if JSON_OUT.value:
        environment = next(
            (s["per_process"][0].get("environment") for s in settings if "error" not in s), {}
        )
        payload = {
            "benchmark": "scaling",
            "date": environment.get("date"),
            "settings": {
                name: flags.FLAGS[name].value
                for name in (
                    "model",
                    "resolution",
                    "stem",
                    "batch_size",
                    "steps",
                    "warmup",
                    "dtype",
                    "remat",
                    "feed",
                )
            },
            "environment": environment,
            "results": settings,
        }
        _common.write_json(JSON_OUT.value, payload)
        print(f"wrote {JSON_OUT.value}")


def print_table(settings) -> None:
    base = next((s.get("images_per_s") for s in settings if s.get("devices") == 1), None)
    header = (
        f"{'processes':>9} | {'devices':>7} | {'per-device batch':>16} | {'compile s':>9} | "
        f"{'img/s':>8} | {'vs 1 device':>11} | {'max RSS MiB/process':>19} | {'last loss':>9}"
    )
    print()
    print(header)
    print("-" * len(header))
    for s in settings:
        rate = s.get("images_per_s")
        relative = rate / base if rate and base else None
        print(
            f"{s['processes']:>9} | {s['devices']:>7} | "
            f"{_common.fmt(s.get('per_device_batch_size'), 'd'):>16} | "
            f"{_common.fmt(s.get('compile_s'), '.1f'):>9} | {_common.fmt(rate, '.1f'):>8} | "
            f"{_common.fmt(relative, '.2f'):>11} | {_common.mib(s.get('peak_bytes')):>19} | "
            f"{_common.fmt(s.get('final_loss', [None])[0], '.5f'):>9}"
        )
    print("(same global batch and steps everywhere: last losses agree to ~1e-5 in float32)")


if __name__ == "__main__":
    app.run(main)
