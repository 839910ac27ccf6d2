"""A workdir never lies (#19): the users' commands through the real launchers (subprocesses).

Each test replays a reported defect: exit code, exactly one `error:` line (the last one on
stderr, no traceback), and that nothing changed where nothing should have (a snapshot of every
file's bytes). One tiny classifier run (module fixture) is copied for the resume cases; the
other drivers' refusals need only the files the check reads (config.json, results.json).
"""

import hashlib
import json
import os
import shutil

import pytest

import configs.anomaly as anomaly_configs
import configs.ddpm as ddpm_configs
import configs.pggan as pggan_configs
from cxrjax import checkpoint as checkpoint_lib
from cxrjax import config as config_lib
from tests import launcher_harness as harness

run = harness.run
one_error = harness.last_error


def snapshot(directory) -> dict[str, str]:
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds bare {constant}")

    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=refuse)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shipped_data_dir):
    """A finished tiny classifier workdir (checkpoints at 6 and 12, logs at 4, 6, 8, 12)."""
    workdir = tmp_path_factory.mktemp("finished") / "cls"
    done = run(
        "train_classifier",
        "--config=configs/classifier.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.data_dir={shipped_data_dir}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return str(workdir), shipped_data_dir, json.loads(done.stdout.strip().splitlines()[-1])


def classifier_args(workdir, data_dir, *extra):
    return (
        "--config=configs/classifier.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *extra,
    )


def unfinished_copy(finished, tmp_path, name):
    workdir, data_dir, _ = finished
    copy = tmp_path / name
    shutil.copytree(workdir, copy)
    os.remove(copy / "results.json")  # as if killed after its last checkpoint
    return copy, data_dir


def test_defect1_finished_workdir_refuses_another_config(finished):
    workdir, data_dir, summary = finished
    before = snapshot(workdir)
    done = run("train_classifier", *classifier_args(workdir, data_dir, "--config.optim.lr=5e-4"))
    error = one_error(done, 2)
    assert "optim.lr 0.001 -> 0.0005" in error and "--overwrite" in error
    assert snapshot(workdir) == before
    # Harmless fields (logging cadence, eval batch): the saved results, nothing rewritten.
    harmless = ("--config.train.log_every=3", "--config.eval.batch_size=32")
    done = run("train_classifier", *classifier_args(workdir, data_dir, *harmless))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == summary
    assert snapshot(workdir) == before
    results = strict_json(os.path.join(workdir, "results.json"))  # NaN-free JSON (defect 8)
    assert [row["step"] for row in results["history"]] == [4, 6, 8, 12]


def _fake_run(directory, config, results=True):
    os.makedirs(directory, exist_ok=True)
    config_lib.save_json(config, os.path.join(directory, "config.json"))
    os.makedirs(os.path.join(directory, "checkpoints", "1"), exist_ok=True)
    if results:
        with open(os.path.join(directory, "results.json"), "w", encoding="utf-8") as f:
            json.dump({"finished": True}, f)


@pytest.mark.parametrize(
    ("launcher", "family", "field", "value", "shown"),
    [
        ("train_pggan", "pggan", "optim.lr", "0.002", "optim.lr 0.001 -> 0.002"),
        ("train_ddpm", "ddpm", "train.num_steps", "9", "train.num_steps 4 -> 9"),
        ("train_anomaly", "anomaly", "fanogan.kappa", "2.0", "fanogan.kappa 1.0 -> 2.0"),
    ],
)
def test_defect1_every_driver_refuses_another_config(
    tmp_path, launcher, family, field, value, shown
):
    modules = {"pggan": pggan_configs, "ddpm": ddpm_configs, "anomaly": anomaly_configs}
    config = modules[family].get_config("tiny")
    extra = []
    if family == "anomaly":
        generator = tmp_path / "pggan"
        _fake_run(generator, pggan_configs.get_config("tiny"), results=False)
        config.generator_workdir = str(generator)
        extra = [f"--config.generator_workdir={generator}"]
    _fake_run(tmp_path / "run", config)
    before = snapshot(tmp_path)
    done = run(
        launcher,
        f"--config=configs/{family}.py:tiny",
        f"--workdir={tmp_path / 'run'}",
        f"--config.{field}={value}",
        *extra,
    )
    assert shown in one_error(done, 2)
    assert snapshot(tmp_path) == before


def test_defect2_refused_resume_keeps_config_json_then_force_resume(finished, tmp_path):
    workdir, data_dir = unfinished_copy(finished, tmp_path, "resume")
    before = snapshot(workdir)
    args = classifier_args(workdir, data_dir, "--config.data.mean=0.4")
    error = one_error(run("train_classifier", *args), 2)
    assert "data.mean 0.5 -> 0.4" in error and "--force_resume" in error
    assert snapshot(workdir) == before  # config.json untouched: evaluate still reads 0.5
    done = run("train_classifier", *args, "--force_resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert strict_json(workdir / "config.json")["data"]["mean"] == 0.4
    changes = strict_json(workdir / "config_changes.json")
    assert changes[-1]["changes"] == [{"field": "data.mean", "old": 0.5, "new": 0.4}]


def _flip(step_dir):
    """Flips the low bit of 8 bytes in the middle of every array-data file of a step's state:
    the files still parse, into slightly different numbers (bit rot, a bad copy).

    Every file, not only the largest: an OCDBT data file can also hold B-tree nodes and
    superseded writes that no restore reads, and which file holds what depends on the timing
    of the save's flushes (the largest one alone missed every array in one CI clone).
    """
    data_dir = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
    for name in os.listdir(data_dir):
        with open(os.path.join(data_dir, name), "r+b") as f:
            data = bytearray(f.read())
            middle = len(data) // 2
            for i in range(middle, min(middle + 8, len(data))):
                data[i] ^= 0x01
            f.seek(0)
            f.write(data)


def _truncate(step_dir):
    """Cuts every array-data file of a step's state to half (a copy that stopped midway).

    Unlike `_flip`, which can land on bytes no array reads (an OCDBT data file also holds
    B-tree nodes and superseded writes), this leaves no readable state whatever the layout.
    """
    data_dir = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
    for name in os.listdir(data_dir):
        path = os.path.join(data_dir, name)
        os.truncate(path, os.path.getsize(path) // 2)


def test_defect3_and_7_corrupt_checkpoint_set_aside_history_whole(finished, tmp_path):
    workdir, data_dir = unfinished_copy(finished, tmp_path, "corrupt")
    _flip(workdir / "checkpoints" / "12")
    ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints")
    saved_wall = ckpt.restore(6, None)[1]["wall_time_s"]
    ckpt.close()
    with open(workdir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 13, "train/lo')  # a torn last line (kill -9 mid-write)
    done = run("train_classifier", *classifier_args(workdir, data_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (workdir / "checkpoints" / "corrupt-12").is_dir()
    # Bit rot in an array shows as a checksum mismatch (tests/test_workdir_integrity.py); a
    # flip that hits the store's own structure fails the read instead: either way, set aside.
    assert "checkpoint step 12 is unreadable" in done.stderr
    assert "resumed from step 6" in done.stderr
    results = strict_json(workdir / "results.json")
    assert [row["step"] for row in results["history"]] == [4, 6, 8, 12]  # both sessions
    assert results["wall_time_s"] > saved_wall > 0  # every session's time
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps == [4, 6, 8, 12]  # replayed rows replaced, torn line gone

    # Every step unreadable: one line, exit 1, no TensorStore spec, no traceback.
    _truncate(workdir / "checkpoints" / "6")
    _truncate(workdir / "checkpoints" / "12")
    os.remove(workdir / "results.json")
    error = one_error(run("train_classifier", *classifier_args(workdir, data_dir)), 1)
    assert "no readable checkpoint" in error and len(error) < 700


def test_defect4_6_bad_requests_are_one_line_and_create_nothing(finished, tmp_path):
    workdir, data_dir, _ = finished
    new = tmp_path / "new"
    error = one_error(run("train_classifier", *classifier_args(new, data_dir, "--config.foo=1")), 2)
    assert "--config.foo=1" in error
    error = one_error(run("train_ddpm", "--config=configs/ddpm.py:tiny", f"--workdir={new}",
                          "--config.optim.lr=inf"), 2)  # fmt: skip
    assert (
        error
        == "error: config.optim.lr: must be a finite number > 0 (not NaN or infinite), got inf"
    )
    out = tmp_path / "synth"
    error = one_error(run("synthesize", "--generator=ddpm", f"--workdir={workdir}",
                          "--num_images=0", f"--output={out}"), 2)  # fmt: skip
    assert "--num_images" in error
    pggan = tmp_path / "pggan"
    _fake_run(pggan, pggan_configs.get_config("tiny"), results=False)
    error = one_error(run("synthesize", "--generator=ddpm", f"--workdir={pggan}",
                          "--num_images=4", f"--output={out}"), 2)  # fmt: skip
    assert "holds a pggan run" in error and "--generator=pggan" in error
    assert not new.exists() and not out.exists()
    # Defect 4: a folder that already holds images is refused, untouched.
    (out / "normal").mkdir(parents=True)
    (out / "normal" / "old.png").write_bytes(b"png")
    error = one_error(run("synthesize", "--generator=pggan", f"--workdir={pggan}",
                          "--num_images=4", f"--output={out}"), 2)  # fmt: skip
    assert "--append" in error and "--overwrite" in error
    assert sorted(snapshot(out)) == ["normal/old.png"]
    # "no checkpoint": one line, no Orbax shutdown traceback.
    empty = tmp_path / "no_checkpoint"
    empty.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), empty / "config.json")
    error = one_error(run("evaluate_classifier", f"--workdir={empty}"), 2)
    assert "no checkpoint" in error
