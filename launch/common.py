"""Flags shared by every entry point: distributed init and logging. Flags end in launch/."""

from __future__ import annotations

from absl import flags, logging

from cxrjax import parallel

COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs (jax.distributed)."
)
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total processes (multi-host runs).")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs).")


def setup() -> None:
    """Initialises jax.distributed when asked (flags or cluster env) and sets log verbosity."""
    logging.set_verbosity(logging.INFO)
    parallel.initialize(
        coordinator_address=COORDINATOR.value,
        num_processes=NUM_PROCESSES.value,
        process_id=PROCESS_ID.value,
    )
