"""The launchers as a user runs them, for every test that asserts "refused: exit 2, one line".

- `run(module, *args)` (or `start` + `finish`): `python -m launch.<module> ...` in a
  subprocess (CPU, test env).
- `one_error(done, code)`: the single `error:` line of a refused command; asserts the exit
  code, that stderr is that one line, no traceback and nothing on stdout. `last_error`: the
  same for a command that logged before it was refused (the error line ends stderr).
- `refusals(module, cases)`: many command lines through one launcher in one process
  (`python -m tests.launcher_harness`): each parsed by the launcher's own flag parser
  (`common.parse_flags`, what `common.main_entry` gives `app.run`) and handed to its `main`;
  for each, the exit code, all that reached file descriptor 2 and whether the workdir exists.
  One process per launcher: a launcher defines its flags on absl's global FLAGS at import.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(devices: int = 1) -> dict[str, str]:
    """A launcher's environment in tests: CPU with `devices` fake devices, fast compiles, the
    shared compilation cache (conftest's settings, so equal programs hit the same entries)."""
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_DISABLE_MOST_OPTIMIZATIONS="true",
        JAX_COMPILATION_CACHE_DIR=os.environ.get(
            "CXRJAX_TEST_CACHE", os.path.join(REPO, ".jax_cache")
        ),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    )


def start(module: str, *args: str) -> subprocess.Popen:
    """`python -m launch.<module> ...` started (several can run side by side)."""
    return subprocess.Popen(
        [sys.executable, "-m", f"launch.{module}", *args],
        cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(process: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return finish(start(module, *args), timeout)


def one_error(done: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single `error:` line of a refused command (asserts exit code, one line, no traceback)."""
    assert done.returncode == code, done.stdout[-1500:] + done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not done.stdout.strip(), done.stdout[-1500:]
    return lines[0]


def last_error(done: subprocess.CompletedProcess, code: int) -> str:
    """The one `error:` line, last on stderr, of a command that may have logged first."""
    assert done.returncode == code, done.stdout[-1500:] + done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert done.stderr.rstrip().splitlines()[-1] == errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not done.stdout.strip(), done.stderr[-3000:]
    return errors[0]


def start_refusals(module: str, cases: list[list[str]]) -> subprocess.Popen:
    """Starts `refusals` for one launcher (several launchers can run side by side)."""
    handle = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    with handle:
        json.dump({"module": module, "cases": cases}, handle)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.launcher_harness", handle.name],
        cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish_refusals(process: subprocess.Popen, timeout: float = 300) -> list[dict]:
    """[{code, stderr, workdir_exists}] per case, from a `start_refusals` process."""
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def refusals(module: str, cases: list[list[str]]) -> list[dict]:
    return finish_refusals(start_refusals(module, cases))


def _workdir(argv: list[str]) -> str | None:
    values = [a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")]
    return values[-1] if values else None


def _one(launcher, argv: list[str]) -> dict:
    """One command line through the launcher, as a fresh process would see it."""
    from absl import flags

    from launch import common

    names = list(flags.FLAGS)
    for name in names:  # the previous case's --config.* overrides (defined per parse)
        if name.startswith("config.") and name in flags.FLAGS:
            delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    sys.argv = ["launch", *argv]  # ml_collections reads the overrides from sys.argv
    sys.stderr.flush()
    saved = os.dup(2)
    code = 0
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            launcher.main(common.parse_flags(sys.argv))
        except SystemExit as stop:
            code = stop.code
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        stderr = captured.read().decode("utf-8", "replace")
    workdir = _workdir(argv)
    return {
        "code": code,
        "stderr": stderr,
        "workdir_exists": bool(workdir and os.path.exists(workdir)),
    }


def _main(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        request = json.load(f)
    os.remove(path)
    os.chdir(REPO)
    launcher = importlib.import_module(f"launch.{request['module']}")
    results = [_one(launcher, argv) for argv in request["cases"]]
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1])
