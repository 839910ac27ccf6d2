"""A workdir (or --output) that cannot be written fails at once, before any data or compile."""

import os
import subprocess
import sys

import pytest

from cxrjax import config as config_lib
from launch import common

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_check_writable_names_the_flag_and_path(tmp_path):
    common.check_writable(str(tmp_path / "new" / "dir"))  # created
    assert (tmp_path / "new" / "dir").is_dir() and not os.listdir(tmp_path / "new" / "dir")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(config_lib.ConfigError, match=r"--output=.*a_file/out is not a writable"):
        common.check_writable(str(blocker / "out"), flag="output")


def test_train_entry_point_fails_before_reading_data(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    data_dir = tmp_path / "data"  # would be created by the first data read
    done = subprocess.run(
        [sys.executable, "-m", "launch.train_ddpm", "--config=configs/ddpm.py:tiny",
         f"--workdir={blocker / 'wd'}", f"--config.data.data_dir={data_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]  # a wrong request: exit 2
    assert f"error: --workdir={blocker / 'wd'} is not a writable directory" in done.stderr
    assert not data_dir.exists()
