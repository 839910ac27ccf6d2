"""launch/prepare_data.py as a user runs it: a subprocess, its stdout, stderr and exit code."""

import os
import pathlib
import re
import subprocess
import sys

from cxrjax.data.builders import testing

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(*flags):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "launch.prepare_data", *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_builds_shipped_dataset_and_prints_counts(tmp_path):
    result = run("--dataset=pneumonia_mnist", f"--data_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "pneumonia_mnist/subset_r28" in out
    assert (
        "train: 2428 images" in out
        and "validation: 270 images" in out
        and "test: 468 images" in out
    )
    assert out.count("normal     1214") == 1 and "pneumonia  234" in out
    assert "skipped corrupt images: 0" in out


def test_image_folder_with_name_and_skipped_file(tmp_path):
    folder = testing.write_image_folder(
        tmp_path / "synth", {"train": {"normal": 3, "pneumonia": 3}}
    )
    testing.write_corrupt(folder / "train" / "normal" / "bad.png")
    flags = [f"--manual_dir={folder}", f"--data_dir={tmp_path / 'out'}", "--resolution=8"]
    result = run("--dataset=image_folder", "--name=synth", "--skip_corrupt", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "image_folder/synth_r8" in result.stdout
    assert "skipped corrupt images: 1\n    train/normal/bad.png" in result.stdout
    split_sizes = dict(re.findall(r"^  (\w+): (\d+) images$", result.stdout, re.MULTILINE))
    assert set(split_sizes) == {"train", "validation"}  # Validation carved from train/.
    assert sum(map(int, split_sizes.values())) == 6  # 7 files, one skipped.


def test_bad_manual_dir_exits_1_with_layout_and_no_traceback(tmp_path):
    result = run(
        "--dataset=nih_chest_xray14",
        f"--manual_dir={tmp_path / 'missing'}",
        f"--data_dir={tmp_path}",
    )
    assert result.returncode == 1
    assert "does not exist or is empty" in result.stderr
    assert "<manual_dir>/Data_Entry_2017.csv" in result.stderr
    assert "https://nihcc.app.box.com/v/ChestXray-NIHCC" in result.stderr
    assert "Traceback" not in result.stderr
