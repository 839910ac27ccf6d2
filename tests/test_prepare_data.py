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


def test_bad_manual_dir_exits_2_with_layout_and_no_traceback(tmp_path):
    result = run(
        "--dataset=nih_chest_xray14",
        f"--manual_dir={tmp_path / 'missing'}",
        f"--data_dir={tmp_path}",
    )
    assert result.returncode == 2
    assert "does not exist or is empty" in result.stderr
    assert "<manual_dir>/Data_Entry_2017.csv" in result.stderr
    assert "https://nihcc.app.box.com/v/ChestXray-NIHCC" in result.stderr
    assert "Traceback" not in result.stderr


# --- defects that must stop before any file is written: exit 2, one line, nothing changed ---


def tree(*roots):
    """Every file and folder under roots with size and mtime: to prove nothing changed."""
    return {
        (str(path), path.stat().st_size if path.is_file() else -1, path.stat().st_mtime_ns)
        for root in roots
        if root.exists()
        for path in [root, *root.rglob("*")]
    }


def assert_refused(result, *texts):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    # One error line, the last (TFDS may log before it); the message itself has no newline.
    message = [line for line in result.stderr.splitlines() if line.startswith("prepare_data:")]
    assert len(message) == 1 and result.stderr.strip().endswith(message[0]), result.stderr
    assert "Traceback" not in result.stderr
    for text in texts:
        assert text in message[0], (text, message[0])


def test_unknown_split_folder_names_exit_2(tmp_path):
    folder = testing.write_image_folder(
        tmp_path / "data", {"training": {"a": 2, "b": 2}, "testing": {"a": 1, "b": 1}}
    )
    before = tree(tmp_path)
    result = run("--dataset=image_folder", f"--manual_dir={folder}", f"--data_dir={tmp_path}/out")
    assert_refused(result, "['testing/', 'training/']", "train/, val/ (or validation/, valid/)")
    assert tree(tmp_path) == before


def test_empty_class_folder_and_empty_folder_exit_2(tmp_path):
    folder = testing.write_image_folder(tmp_path / "data", {"": {"normal": 3}})
    (folder / "pneumonia").mkdir()
    empty = tmp_path / "empty"
    (empty / "normal").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    before = tree(tmp_path)
    result = run("--dataset=image_folder", f"--manual_dir={folder}", f"--data_dir={tmp_path}/out")
    assert_refused(result, "class folders with no images: ['pneumonia']", "normal/ 3")
    result = run("--dataset=image_folder", f"--manual_dir={empty}", f"--data_dir={tmp_path}/out")
    assert_refused(result, "no images in", "normal/", "split folders train/, val/")
    assert tree(tmp_path) == before


def test_same_name_from_another_folder_exit_2(tmp_path):
    runs = [tmp_path / run_name / "syn" for run_name in ("runA", "runB")]
    for seed, folder in enumerate(runs):
        testing.write_image_folder(folder, {"": {"normal": 3 + seed, "pneumonia": 3}})
    out = f"--data_dir={tmp_path}/out"
    first = run("--dataset=image_folder", f"--manual_dir={runs[0]}", "--name=syn", out)
    assert first.returncode == 0, first.stderr[-2000:]
    before = tree(tmp_path)
    result = run("--dataset=image_folder", f"--manual_dir={runs[1]}", "--name=syn", out)
    assert_refused(result, f"was prepared from {runs[0]}, not {runs[1]}")
    assert tree(tmp_path) == before
    # Names derived from the path (launch.synthesize's default) never collide.
    from cxrjax.data.builders import image_folder

    assert image_folder.path_name(runs[0]) != image_folder.path_name(runs[1])
    assert image_folder.path_name(runs[0]).startswith("syn-")


def test_shared_patients_warn_and_strict_exit_2(tmp_path):
    folder = tmp_path / "data"
    for split, names in (("train", ["00000001_000", "00000002_000"]), ("test", ["00000001_001"])):
        for cls in ("normal", "effusion"):
            for name in names:
                testing.write_image(folder / split / cls / f"{name}.png", len(name))
    out = f"--data_dir={tmp_path}/out"
    before = tree(tmp_path)
    result = run("--dataset=image_folder", f"--manual_dir={folder}", "--strict_patients", out)
    assert_refused(result, "1 of 2 patients have images in more than one split", "train/test: 1")
    assert tree(tmp_path) == before
    result = run("--dataset=image_folder", f"--manual_dir={folder}", "--show_batches=0", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "patients in more than one split: 1" in result.stdout
    assert "1 of 2 patients have images in more than one split" in result.stderr  # the warning
