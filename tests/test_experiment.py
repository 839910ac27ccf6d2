"""The experiment end to end (smoke preset): results.json schema and invariants, SIGTERM in
stage 2 and a re-run that finishes with the same results, config validation.

One uninterrupted smoke run (a subprocess, ~3 min on 2 cores) is shared by the module.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import configs.experiment as experiment_configs
from cxrjax import config as config_lib
from cxrjax import experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    # The same XLA settings as conftest (4 fake devices, fast compiles, the shared cache), so
    # both subprocess runs compile identical programs.
    return dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        JAX_COMPILATION_CACHE_DIR=os.environ.get(
            "CXRJAX_TEST_CACHE", os.path.join(REPO, ".jax_cache")
        ),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    )


def _command(workdir, data_dir):
    return [
        sys.executable, "-m", "launch.run_experiment", "--config=configs/experiment.py:smoke",
        f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
    ]  # fmt: skip


def _flat(metrics):
    """{key: number} with CI lists spread out (key[0], key[1]); strings dropped."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, list):
            out.update({f"{key}[{i}]": v for i, v in enumerate(value)})
        elif isinstance(value, int | float):
            out[key] = value
    return out


@pytest.fixture(scope="module")
def smoke_run(shipped_data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("experiment") / "smoke"
    done = subprocess.run(
        _command(workdir, shipped_data_dir),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    results = json.loads((workdir / "results.json").read_text())
    return {"workdir": workdir, "results": results, "stdout": done.stdout}


def test_smoke_results_follow_the_schema_and_invariants(smoke_run):
    results, workdir = smoke_run["results"], smoke_run["workdir"]
    assert experiment.check_results(results) == []
    assert set(results["arms"]) == set(experiment.ARMS)
    seeds = results["config"]["seeds"]
    for arm, entry in results["arms"].items():
        assert [row["seed"] for row in entry["per_seed"]] == list(range(seeds))
        for row in entry["per_seed"]:
            # Thresholds and checkpoints from validation; training never read the test split.
            assert row["threshold_split"] == "val" and row["checkpoint_selection_split"] == "val"
            assert "test" not in row["training_splits"]
            real = [p for p in row["training_data"] if not p["synthetic"]]
            synthetic = [p for p in row["training_data"] if p["synthetic"]]
            assert len(real) == 1
            # The scarce split: 10 % of the 1214 normals; arm (e) keeps them all.
            normals = 1214 if arm == "real_full" else 121
            assert real[0]["per_class"] == {"normal": normals, "pneumonia": 1214}
            if arm in ("pggan", "ddpm"):
                count = results["synthetic"][arm]["count"]
                assert sum(p["records"] for p in synthetic) == count
                assert sum(p["per_class"]["normal"] for p in synthetic) == count
            else:
                assert not synthetic
        # Every metric with a CI, the CI around the point (also checked by check_results).
        for key in experiment.METRICS:
            lo, hi = entry["seed_mean"][f"{key}_ci"]
            assert lo <= entry["seed_mean"][key] <= hi
            assert entry["aggregate"][key]["n"] == seeds
    # Balance 0.25: 304 of the 1214 normals, 121 of them real.
    assert results["synthetic"]["pggan"]["count"] == 304 - 121
    # The generators trained on the scarce split only (PGGAN's records, DDPM's too).
    for kind in ("pggan", "ddpm"):
        assert results["generators"][kind]["train_records"] == 121 + 1214
        assert results["split_use"]["training"][kind] == ["train"]
    for name in ("anomaly/pggan_normal", "anomaly/ddpm_normal"):
        assert results["generators"][name]["train_records"] == 1214  # normals only
    assert set(results["anomaly"]) == {"fanogan", "ddpm"}
    for method in ("fanogan", "ddpm"):
        assert results["anomaly"][method]["threshold_split"] == "val"
        assert 0.0 <= results["anomaly"][method]["test"]["auc"] <= 1.0
    assert set(results["quality"]) == {"pggan", "ddpm"}
    comparisons = {(c["arm"], c["reference"]) for c in results["evaluation"]["comparisons"]}
    assert ("pggan", "real_scarce") in comparisons and ("ddpm", "baseline") in comparisons
    report = (workdir / "report.md").read_text()
    assert "## Did synthetic data help?" in report
    for figure in results["figures"].values():
        assert (workdir / figure).is_file() and f"({figure})" in report
    assert {"roc_arms", "pggan_samples_normal", "ddpm_embedding_pca", "pggan_nearest_pairs"} <= set(
        results["figures"]
    )
    assert set(results["wall_time_s"]) == {*experiment.STAGES, "total"}
    assert "verdicts" in smoke_run["stdout"]


def test_sigterm_in_stage_2_then_rerun_finishes_with_the_same_results(
    smoke_run, shipped_data_dir, tmp_path
):
    """Stage 1 and the anomaly sub-runs are copied from the module's run (they are skipped as
    finished); stage 2 is interrupted with SIGTERM once an arm has a checkpoint, then re-run."""
    source = smoke_run["workdir"]
    workdir = tmp_path / "smoke"
    top_level = {"arms", "results.json", "report.md", "figures"}
    shutil.copytree(
        source, workdir, ignore=lambda d, names: top_level & set(names) if d == str(source) else ()
    )
    # Sub-runs' own results.json (generators, anomaly) are kept: only the top level is removed.
    assert (workdir / "pggan" / "results.json").exists()
    command = _command(workdir, shipped_data_dir)
    proc = subprocess.Popen(
        command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    checkpoints = workdir / "arms" / "baseline" / "seed0" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before stage 2 was interrupted"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-5000:]
    assert "preempted (SIGTERM)" in output and "re-run the same command" in output
    assert not (workdir / "results.json").exists()
    finished_arms = list((workdir / "arms").glob("*/seed*/results.json"))
    assert 0 < len(finished_arms) < len(experiment.ARMS) * 2  # stopped inside stage 2

    resumed = subprocess.run(
        command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    results = json.loads((workdir / "results.json").read_text())
    expected = smoke_run["results"]
    assert experiment.check_results(results) == []
    for arm in experiment.ARMS:
        got, want = results["arms"][arm], expected["arms"][arm]
        for row_got, row_want in zip(got["per_seed"], want["per_seed"], strict=True):
            assert row_got["selected_step"] == row_want["selected_step"]
            assert _flat(row_got["test"]) == pytest.approx(_flat(row_want["test"]), rel=1e-6)
        assert _flat(got["seed_mean"]) == pytest.approx(_flat(want["seed_mean"]), rel=1e-6)
    for got, want in zip(
        results["evaluation"]["comparisons"], expected["evaluation"]["comparisons"], strict=True
    ):
        assert got["p_value"] == pytest.approx(want["p_value"], rel=1e-6, abs=1e-12)
    # A finished workdir returns its results without redoing anything.
    again = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0 and "verdicts" in again.stdout


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("arms", ("real_scarce", "gan"), "unknown arms"),
        ("data.val_split", "test", "data.val_split"),
        ("quality.real_split", "test", "quality.real_split"),
        ("scarcity.fraction", 0.0, "scarcity.fraction"),
        ("anomaly.generators", "borrowed", "anomaly.generators"),
        ("classifier.train.global_batch_size", 0, "arms/real_scarce/seed0"),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, field, value, message):
    config = experiment_configs.get_config("smoke")
    node = config
    *parents, leaf = field.split(".")
    for part in parents:
        node = node[part]
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        experiment.run(config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize(
    "preset",
    ["smoke", "demo", "kermany_binary_128", "kermany_3class_256", "nih14_224"],
)
def test_presets_validate_and_plan_every_sub_run(preset, tmp_path):
    config = experiment_configs.get_config(preset)
    experiment.validate(config, str(tmp_path))
    runs = experiment.plan(config, str(tmp_path))
    arms = [name for name, (kind, _, _) in runs.items() if kind == "classifier"]
    assert len(arms) == len(config.arms) * config.seeds
    for name, (kind, _, sub) in runs.items():
        if kind == "classifier":
            arm = name.split("/")[1]
            assert bool(sub.data.keep_class) == (arm != "real_full")
            assert bool(sub.data.synthetic.manual_dir) == (arm in ("pggan", "ddpm"))
            assert sub.data.augment.enabled == (arm == "baseline")
            assert sub.data.name == config.data.name
        if kind in ("pggan", "ddpm") and not name.startswith("anomaly/"):
            assert sub.data.keep_class == config.scarcity.class_name
    if preset == "nih14_224":  # multi-label: unconditional generators of the rare finding
        assert runs["pggan"][2].data.only_class == "Hernia"
        assert runs["arms/pggan/seed0"][2].data.synthetic.label == "Hernia"


def test_delong_target_and_headline_for_each_label_kind():
    import numpy as np

    from cxrjax.metrics import classification as cls_metrics

    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], 60)
    binary = {"class_names": ["normal", "pneumonia"], "label_kind": "multiclass"}
    y, s = experiment.target_scores(np.arange(60) % 2, probs[:, :2], binary, "normal")
    np.testing.assert_array_equal(y, np.arange(60) % 2)  # the positive class, as evaluate
    np.testing.assert_array_equal(s, probs[:, 1])
    three = {"class_names": ["normal", "bacteria", "virus"], "label_kind": "multiclass"}
    labels = np.arange(60) % 3
    y, s = experiment.target_scores(labels, probs, three, "virus")  # one-vs-rest, scarce class
    np.testing.assert_array_equal(y, labels == 2)
    np.testing.assert_array_equal(s, probs[:, 2])
    multi = {"class_names": ["Hernia", "Mass", "Nodule"], "label_kind": "multilabel"}
    hot = (rng.random((60, 3)) > 0.5).astype(np.float32)
    y, s = experiment.target_scores(hot, probs, multi, "Hernia")
    np.testing.assert_array_equal(y, hot[:, 0])
    result = cls_metrics.evaluate(labels, probs, class_names=three["class_names"], n_bootstrap=20)
    head = experiment.headline(result)
    assert head["auc"] == result["macro"]["auc"] and head["accuracy"] == result["accuracy"]
    assert set(experiment.scarce_class_metrics(result, "virus")) >= set(experiment.METRICS)
    assert experiment.verdict(0.02, 0.01, 0.05) == "higher AUC"
    assert experiment.verdict(-0.02, 0.01, 0.05) == "lower AUC"
    assert experiment.verdict(0.02, 0.2, 0.05) == "no detectable difference"
