"""Distributed init, the device mesh, shardings, and host batch -> global array.

Data parallelism in cxrjax is `jax.jit` over a 1-D device mesh with `NamedSharding`: the
batch is sharded along the "data" axis, parameters and optimizer state are replicated, and
XLA inserts the gradient all-reduce. This is the successor of `jax.pmap` (in maintenance
mode since JAX 0.8): steps are written as if for one device, and the same compiled step runs
on one CPU, many GPUs, or many hosts. Under jit, BatchNorm statistics over a batch-sharded
array are already global, so every device sees identical statistics.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cxrjax.config import ConfigError

DATA_AXIS = "data"

# Environment variables that mean "this process is one of several" (SLURM, Open MPI, explicit).
_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> None:
    """Calls `jax.distributed.initialize` only when a multi-process run is requested.

    Explicit arguments (from launch flags) win; otherwise JAX's own cluster auto-detection
    (SLURM, Open MPI, TPU pods) runs when the environment says there are several tasks. A
    single-process launch does nothing, so the same command works on a laptop.
    """
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    detected = any(int(os.environ.get(name, "1") or 1) > 1 for name in _CLUSTER_ENV[:2]) or bool(
        os.environ.get(_CLUSTER_ENV[2])
    )
    if not (explicit or detected):
        return
    if jax.distributed.is_initialized():
        return
    kwargs: dict[str, Any] = {}
    if coordinator_address is not None:
        kwargs.update(coordinator_address=coordinator_address)
    if num_processes is not None:
        kwargs.update(num_processes=num_processes)
    if process_id is not None:
        kwargs.update(process_id=process_id)
    if local_device_ids is not None:
        kwargs.update(local_device_ids=list(local_device_ids))
    # CPU collectives across processes need gloo; the option only affects the CPU backend, and
    # it must be set without touching the backend (initialize has to come first).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


# The YNNPACK fusions that jaxlib 0.10's CPU backend enables by default run the convolutions'
# weight gradients (which XLA canonicalises into a convolution with a window as large as the
# image and the batch as features) at ~2 GFLOP/s on this project's 2-core AVX2 machine: a
# DenseNet121 dense block's forward + backward took 3.4x longer with them than without
# (benchmarks/RESULTS.md, "DenseNet121 on CPU"). An empty list turns them all off, so XLA's
# own (Eigen) convolutions and dots run instead; outputs agree to float32 rounding.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def cpu_compiler_options() -> dict[str, str] | None:
    """`jax.jit(..., compiler_options=...)` for conv nets on the CPU backend, else None.

    None when the default backend is not the CPU or when XLA_FLAGS already chooses the YNN
    fusion types (the user's setting wins).
    """
    if jax.default_backend() != "cpu":
        return None
    if any(name in os.environ.get("XLA_FLAGS", "") for name in _CPU_OPTIONS):
        return None
    return dict(_CPU_OPTIONS)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: every device of every process)."""
    devices = list(devices) if devices is not None else jax.devices()
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over the "data" axis, the rest whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, step, rng)."""
    return NamedSharding(mesh, P())


def check_global_batch(
    global_batch_size: int, mesh: jax.sharding.Mesh, what: str = "batch"
) -> None:
    """Fails early, with the numbers, when a global batch cannot be split evenly."""
    num_devices = mesh.devices.size
    if global_batch_size <= 0 or global_batch_size % num_devices:
        raise ConfigError(
            f"global {what} size {global_batch_size} must be a positive multiple of the device "
            f"count {num_devices} (jax.device_count() over {jax.process_count()} process(es))"
        )
    if global_batch_size % jax.process_count():
        raise ConfigError(
            f"global {what} size {global_batch_size} must divide evenly over "
            f"{jax.process_count()} processes"
        )


def local_batch_size(global_batch_size: int) -> int:
    """The slice of the global batch each process reads."""
    return global_batch_size // jax.process_count()


def host_to_global(batch: Any, mesh: jax.sharding.Mesh) -> Any:
    """Assembles process-local numpy batches into global arrays sharded over "data".

    Each process passes only its own rows; the global batch is their concatenation in
    process order. Non-array leaves (e.g. string ids) are dropped by the caller beforehand.
    """
    sharding = data_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Places a host pytree on every device of the mesh (same value everywhere)."""
    return jax.device_put(tree, replicated(mesh))


def to_host(tree: Any) -> Any:
    """Fetches a (possibly multi-host sharded) pytree to numpy on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def is_main_process() -> bool:
    """Only process 0 writes logs, images and reports."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
