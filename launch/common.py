"""Flags shared by every entry point: distributed init and logging. Flags end in launch/."""

from __future__ import annotations

import json
import logging as std_logging
import os
import sys
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from absl import flags, logging

from cxrjax import checkpoint as checkpoint_lib
from cxrjax import config as config_lib
from cxrjax import parallel
from cxrjax.data import builders, imageio
from cxrjax.train import loop

# Errors that mean "your input is wrong" or "the run cannot go on" (an unwritable workdir, a
# failed checkpoint save, NaN under train.nonfinite=abort, an unreadable training record, too
# many masked records): one clear line and exit 1, no traceback. The message names the field,
# path, step or record.
USER_ERRORS = (
    config_lib.ConfigError,
    builders.DatasetError,
    checkpoint_lib.CheckpointError,
    FileNotFoundError,
    loop.NonFiniteError,
    loop.BadRecordsError,
    imageio.CorruptImageError,
)

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


def output_directory() -> tuple[str, str] | None:
    """(flag, directory) a job writes to: --output when given, else --workdir (if defined)."""
    for name in ("output", "workdir"):
        if name in flags.FLAGS and flags.FLAGS[name].value:
            return name, flags.FLAGS[name].value
    return None


def check_writable(directory: str, flag: str = "workdir") -> None:
    """Creates `directory` and writes/removes a probe file; ConfigError naming the flag if not.

    Runs on every process before any data read or compile, so a typo'd or read-only workdir
    fails in a second instead of after the first checkpoint interval.
    """
    directory = os.path.abspath(os.path.expanduser(directory))
    probe = os.path.join(directory, f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise config_lib.ConfigError(
            f"--{flag}={directory} is not a writable directory ({error.strerror or error}); "
            "choose another path"
        ) from error


def run_job(
    job: Callable[[], Mapping[str, Any]], summarize: Callable[[Mapping[str, Any]], Mapping]
) -> None:
    """Runs a train/evaluate job: user errors exit 1 with their message; a stopped run says
    how to resume; a finished one prints a one-line JSON summary.

    The directory the job writes (--output, else --workdir) is checked writable first.
    """
    try:
        target = output_directory()
        if target is not None:
            check_writable(target[1], flag=target[0])
        results = job()
    except USER_ERRORS as error:
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    if results.get("finished") is False:
        print(f"stopped at step {results['step']}; re-run the same command to resume")
        return
    print(json.dumps(dict(summarize(results)), default=str))
