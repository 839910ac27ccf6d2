"""Flags shared by every entry point: distributed init, logging, and the one place that turns
known exceptions into a one-line error and an exit code. Flags end in launch/.

Exit codes: 0 done (or stopped cleanly by SIGTERM, "re-run to resume"); 2 the request is
wrong (a flag, a config field, a workdir of another config, missing data: fix the command);
1 the run failed on its way (a save, NaN training, unreadable records): the line says what
to do. Both print one `error: ...` line and no traceback; any other exception keeps its
traceback (a bug to report). Validation runs before any directory is created.
"""

from __future__ import annotations

import atexit
import logging as std_logging
import os
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import app, flags, logging

from cxrjax import checkpoint as checkpoint_lib
from cxrjax import config as config_lib
from cxrjax import fileio, parallel
from cxrjax.data import builders, imageio
from cxrjax.train import loop
from cxrjax.train import workdir as workdir_lib

# (exception types, exit code), first match wins: the one map from known exceptions to a
# one-line error. 2: the request is wrong (field, flag, workdir of another config, data that
# is missing or laid out wrongly); 1: the run could not go on (a failed or unreadable
# checkpoint, NaN training, unreadable records). Messages name the field, path, step or record.
ERROR_EXITS: tuple[tuple[tuple[type[BaseException], ...], int], ...] = (
    ((config_lib.ConfigError,), 2),
    ((flags.Error,), 2),
    ((builders.DatasetError, FileNotFoundError), 2),
    ((checkpoint_lib.CheckpointError,), 1),
    ((loop.NonFiniteError, loop.BadRecordsError, imageio.CorruptImageError), 1),
)
USER_ERRORS = tuple(kind for kinds, _ in ERROR_EXITS for kind in kinds)


def exit_code(error: BaseException) -> int | None:
    """The exit code of a known exception (ERROR_EXITS), None for an unexpected one."""
    for kinds, code in ERROR_EXITS:
        if isinstance(error, kinds):
            return code
    return None


def one_line(error: BaseException) -> str:
    """The error as one line (newlines folded; TensorStore-sized messages shortened)."""
    text = " ".join(str(error).split())
    return text if len(text) <= 600 else text[:597] + "..."


def fail(error: BaseException | str, code: int = 2) -> None:
    """Prints `error: <one line>` to stderr and exits with `code` (no traceback)."""
    message = error if isinstance(error, str) else one_line(error)
    print(f"error: {message}", file=sys.stderr, flush=True)
    atexit.unregister(_quiet_stderr_at_exit)  # registered at most once
    atexit.register(_quiet_stderr_at_exit)
    sys.exit(code)


def _quiet_stderr_at_exit() -> None:
    """At interpreter exit after an error line, stderr (fd 2) goes to /dev/null.

    A failed Orbax restore can leave TensorStore reads in flight; on a loaded CPU their tasks
    are finalized during shutdown and print tracebacks after the one line the user must see
    last. Registered after logging's own exit handler, so it runs before logging shuts down
    and before leftover objects are finalized; a process that did not fail never registers it.
    """
    try:
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except (OSError, ValueError):
        pass


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl's flag parsing with every error as one line and exit 2 (`app.run(flags_parser=)`):
    unknown flags, bad values, and ml_collections' override errors (an unknown
    `--config.field`, a value of the wrong type), which otherwise print chained tracebacks."""
    try:
        return flag_values(list(argv))
    except flags.Error as error:
        fail(f"{one_line(error)} (--helpfull lists the flags)")
    except (KeyError, AttributeError, TypeError, ValueError) as error:
        fail(_override_error(argv, error))
    return []  # not reached


def _override_error(argv: Sequence[str], error: BaseException) -> str:
    """Names the --config.* override ml_collections could not apply."""
    overrides = [a for a in argv if a.startswith("--config.")]
    reason = one_line(error).strip("\"'")
    for arg in overrides:
        field = arg.split("=", 1)[0][len("--config.") :]
        if any(part.strip("'\"") in reason for part in field.split(".")):
            return (
                f"{arg}: the config has no field {field!r} or cannot take that value "
                f"({type(error).__name__}: {reason}); see the config file for its fields"
            )
    return f"cannot apply the --config overrides {overrides} ({type(error).__name__}: {reason})"


def main_entry(main: Callable[[list[str]], None]) -> None:
    """`app.run(main)` with one-line flag errors (exit 2); use in every entry point."""
    app.run(main, flags_parser=parse_flags)


OVERWRITE = "overwrite"
FORCE_RESUME = "force_resume"


def define_workdir_flags() -> Callable[[], dict[str, bool]]:
    """--overwrite / --force_resume for the trainers; returns a getter of their values."""
    overwrite = flags.DEFINE_bool(
        OVERWRITE, False, "Discard the run in --workdir (its files) and train from scratch."
    )
    force = flags.DEFINE_bool(
        FORCE_RESUME,
        False,
        "Continue the unfinished run in --workdir although config fields changed (recorded "
        "in config_changes.json).",
    )
    return lambda: {"overwrite": overwrite.value, "force_resume": force.value}


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


def validate_training(driver: Any, config: Any, workdir: str, options: Mapping) -> None:
    """A trainer's checks before anything is written: its config (`driver.validate`), then
    the workdir's recorded config against this one (`workdir.check`)."""
    driver.validate(config)
    workdir_lib.check(config, workdir, **options)


def run_job(
    job: Callable[[], Mapping[str, Any]],
    summarize: Callable[[Mapping[str, Any]], Mapping],
    validate: Callable[[], Any] | None = None,
) -> None:
    """Runs a train/evaluate job: known errors print one line and exit 2 or 1 (`ERROR_EXITS`);
    a stopped run says how to resume; a finished one prints a one-line JSON summary.

    `validate` (config and flag checks, the workdir/config comparison: nothing written) runs
    first; only then is the directory the job writes (--output, else --workdir) created and
    checked writable.
    """
    try:
        if validate is not None:
            validate()
        target = output_directory()
        if target is not None:
            check_writable(target[1], flag=target[0])
        results = job()
    except USER_ERRORS as error:
        fail(error, exit_code(error))
    if results.get("finished") is False:
        print(f"stopped at step {results['step']}; re-run the same command to resume")
        return
    print(fileio.dumps(dict(summarize(results))))
