"""Flags shared by every entry point: distributed init and logging. Flags end in launch/."""

from __future__ import annotations

import logging as std_logging

from absl import flags, logging

from cxrjax import parallel

COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs (jax.distributed)."
)
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total processes (multi-host runs).")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs).")


class _QuietLibraries(std_logging.Filter):
    """Drops INFO chatter of Orbax/TFDS/Grain (hundreds of lines per save); keeps warnings."""

    _NOISY = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/etils/")

    # Orbax warns at every save without validation metrics; saves between evals are expected.
    _EXPECTED = ("did not provide metrics",)

    def filter(self, record: std_logging.LogRecord) -> bool:
        if any(text in str(record.msg) for text in self._EXPECTED):
            return False
        if record.levelno >= std_logging.WARNING:
            return True
        return not any(part in record.pathname for part in self._NOISY)


def setup() -> None:
    """Initialises jax.distributed when asked (flags or cluster env) and sets log verbosity."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    parallel.initialize(
        coordinator_address=COORDINATOR.value,
        num_processes=NUM_PROCESSES.value,
        process_id=PROCESS_ID.value,
    )
