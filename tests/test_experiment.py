"""The experiment end to end (smoke preset): results.json schema and invariants, the same prior
and budget for the control and the synthetic arms, what the judge and CAS classifiers may see,
SIGTERM in stage 3 and a re-run that finishes with the same results, config validation.

One uninterrupted smoke run (a subprocess, ~3 min on 2 cores) is shared by the module.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import configs.experiment as experiment_configs
from cxrjax import config as config_lib
from cxrjax import experiment
from tests import launcher_harness as harness

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    # conftest's 4 fake devices, so the subprocess runs compile the programs the tests do.
    return harness.env(devices=4)


def _command(workdir, data_dir):
    return [
        sys.executable, "-m", "launch.run_experiment", "--config=configs/experiment.py:smoke",
        f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
    ]  # fmt: skip


def _top_level(*names):
    """A copytree `ignore` that leaves out `names` in the copied folder's top level only."""
    top = []

    def ignore(directory, entries):
        if not top:
            top.append(directory)
        return set(names) & set(entries) if directory == top[0] else set()

    return ignore


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
    count = results["synthetic"]["count"]
    assert count == 304 - 121  # balance 0.25: 304 of the 1214 normals, 121 of them real
    for arm, entry in results["arms"].items():
        assert [row["seed"] for row in entry["per_seed"]] == list(range(seeds))
        for row in entry["per_seed"]:
            # Thresholds and checkpoints from validation; training never read the test split.
            assert row["threshold_split"] == "val" and row["checkpoint_selection_split"] == "val"
            assert "test" not in row["training_splits"]
            real = [p for p in row["training_data"] if not p["synthetic"]]
            synthetic = [p for p in row["training_data"] if p["synthetic"]]
            # The scarce split: 10 % of the 1214 normals; real_full keeps them all.
            normals = 1214 if arm == "real_full" else 121
            assert real[0]["per_class"] == {"normal": normals, "pneumonia": 1214}
            if experiment.design.arm_generator(arm):
                assert sum(p["per_class"]["normal"] for p in synthetic) == count
            else:
                assert not synthetic
            if arm == "oversampled":  # the same prior with repeats of the 121 real normals
                assert len(real) == 2 and real[1]["per_class"] == {"normal": count, "pneumonia": 0}
        for key in experiment.METRICS:
            lo, hi = entry["seed_mean"][f"{key}_ci"]
            assert lo <= entry["seed_mean"][key] <= hi
            assert entry["aggregate"][key]["n"] == seeds
    assert set(results["quality"]) == {"pggan", "ddpm"}
    for q in results["quality"].values():
        assert q["feature_space"]["name"] == "judge"
        assert set(q["class_fidelity"]["synthetic"]) == {"normal", "pneumonia"}
        assert q["class_fidelity"]["real"]["normal"]["n"] == 135
        assert isinstance(q["gate"]["adequate"], bool)
        assert len(q["distance_matrix"]["fd"]) == 2 and len(q["distance_matrix"]["fd"][0]) == 2
        assert q["filter"]["attempts"] >= q["filter"]["accepted"]
    assert set(results["cas"]) == {"pggan", "ddpm", "real"}
    assert results["headroom"]["test"]["paired_t"]["n"] == seeds
    comparisons = {(c["arm"], c["reference"]): c for c in results["evaluation"]["comparisons"]}
    assert ("pggan", "oversampled") in comparisons and ("augmented", "real_scarce") in comparisons
    assert comparisons[("ddpm_filtered", "oversampled")]["primary"]
    for c in comparisons.values():
        assert len(c["per_seed_differences"]) == seeds
        assert c["p_holm"] >= c["primary_p_value"]
        # The same paired difference on validation, from the arms' own per-seed figures.
        val = [
            a["val"]["auc"] - b["val"]["auc"]
            for a, b in zip(
                results["arms"][c["arm"]]["per_seed"],
                results["arms"][c["reference"]]["per_seed"],
                strict=True,
            )
        ]
        assert c["val"]["n"] == seeds and c["val"]["mean"] == pytest.approx(np.mean(val))
    report = (workdir / "report.md").read_text()
    assert report.split("\n")[2].startswith("**Headroom.**")  # the report opens with it
    model = results["classifier_model"]
    assert f"{model['name']} ({model['parameters']:,} parameters)" in report
    for figure in results["figures"].values():
        assert (workdir / figure).is_file() and f"({figure})" in report
    assert {"roc_arms", "samples"} <= set(results["figures"])
    assert set(results["wall_time_s"]) == {*experiment.STAGES, "total", "invocations"}
    # The profile: every stage, its sections adding up to its wall time; the sub-runs' own.
    profile = results["profile"]
    assert set(profile["stages"]) == set(experiment.STAGES)
    for stage, row in profile["stages"].items():
        parts = sum(v for k, v in row.items() if k != "total")
        assert abs(parts - row["total"]) < 0.1 and row["total"] == results["wall_time_s"][stage]
        assert row["sub-runs"] > 0 and row.get("compile", 0.0) >= 0
    # Stage 3's classifiers reuse the jitted steps of stage 1's (one computation): they only
    # compile for what differs (e.g. the balanced loss's class weights).
    assert profile["stages"]["data_and_headroom"]["compile"] > 0
    assert (
        profile["sub_runs"]["classifier_arms"]["count"]
        == sum(len(a["per_seed"]) for a in results["arms"].values()) - 2 * seeds
    )  # real_scarce and real_full ran in stage 1
    assert profile["sub_runs"]["classifier_arms"]["steps"] > 0
    assert "## Where the time went" in report
    assert "verdicts" in smoke_run["stdout"]


def test_control_and_synthetic_arms_share_prior_and_optimizer_steps(smoke_run):
    results = smoke_run["results"]
    rows = {
        arm: results["arms"][arm]["per_seed"]
        for arm in results["arms"]
        if arm == "oversampled" or experiment.design.arm_generator(arm)
    }
    priors = {arm: [r["class_prior"] for r in per_seed] for arm, per_seed in rows.items()}
    assert len({str(p) for p in priors.values()}) == 1, priors
    assert priors["oversampled"][0] == {"normal": 304, "pneumonia": 1214}
    budgets = {
        (r["num_steps"], r["global_batch_size"])
        for per_seed in results["arms"].values()
        for r in per_seed["per_seed"]
    }
    assert budgets == {(24, 16)}
    # The recorded step counts are what the runs did (each run's last step).
    for per_seed in rows.values():
        for row in per_seed:
            metrics = smoke_run["workdir"] / row["workdir"] / "metrics.jsonl"
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
            assert max(steps) == 24
            # Per-seed figures are off in experiments (classifier.eval.figures): the report
            # draws its own across seeds.
            assert not list((metrics.parent).glob("*.png"))


def test_judge_and_cas_see_only_images_the_generators_saw(smoke_run, shipped_data_dir):
    """Fails if the judge or a CAS classifier trained on a validation or test image, or on a
    real training image outside the generators' scarce split."""
    from cxrjax.data import mixing
    from cxrjax.train import classifier_run

    workdir = smoke_run["workdir"]
    config = experiment_configs.get_config("smoke")
    config.data.data_dir = shipped_data_dir
    runs = experiment.plan(config, str(workdir))
    generator = runs["pggan"][2]
    splits, spec = classifier_run.load_splits(runs["judge"][2].data)
    labels = mixing.read_labels(splits["train"])
    seen = set(mixing.training_subset(splits["train"], spec, generator.data, labels).selected())
    judge = runs["judge"][2]
    source, _, description, _ = classifier_run.training_source(judge, splits, spec)
    assert description["real_split"] == "train" and judge.data.train_split == "train"
    for part in source.parts:
        assert part.source is splits["train"] and not part.synthetic
        assert set(part.selected()) <= seen
    assert judge.train.select == "last"  # validation picks nothing for the judge
    for name in ("cas/pggan", "cas/ddpm", "cas/real"):
        result = json.loads((workdir / name / "results.json").read_text())
        assert all(p["synthetic"] for p in result["training_data"]["parts"])
        assert result["splits_used"]["training"] == ["synthetic"]
    # The real CAS control holds scarce-split records only (file names carry the record index).
    files = list((workdir / "synthetic" / "real_cas").glob("*/real_*.png"))
    assert files and {int(f.stem.split("_")[1]) for f in files} <= seen
    use = smoke_run["results"]["split_use"]["training"]
    assert use["judge"] == ["train"] and use["cas/pggan"] == ["synthetic"]


def test_sigterm_in_stage_3_then_rerun_finishes_with_the_same_results(
    smoke_run, shipped_data_dir, tmp_path
):
    """Stages 1-2 and the anomaly sub-runs are copied from the module's run (they are skipped
    as finished); stage 3 is interrupted with SIGTERM once an arm has a checkpoint, then re-run."""
    source = smoke_run["workdir"]
    workdir = tmp_path / "smoke"
    stage_3 = {f"{arm}" for arm in experiment.ARMS if arm not in ("real_scarce", "real_full")}
    top_level = {"results.json", "report.md", "figures"}

    def ignore(d, names):
        if d == str(source):
            return top_level & set(names)
        if d == str(source / "arms"):
            return stage_3 & set(names)
        return ()

    shutil.copytree(source, workdir, ignore=ignore)
    assert (workdir / "pggan" / "results.json").exists()
    command = _command(workdir, shipped_data_dir)
    proc = subprocess.Popen(
        command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    checkpoints = workdir / "arms" / "oversampled" / "seed0" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before stage 3 was interrupted"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-5000:]
    assert "preempted (SIGTERM)" in output and "re-run the same command" in output
    assert not (workdir / "results.json").exists()

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
    for got, want in zip(
        results["evaluation"]["comparisons"], expected["evaluation"]["comparisons"], strict=True
    ):
        assert got["primary_p_value"] == pytest.approx(want["primary_p_value"], rel=1e-6)
        assert got["p_holm"] == pytest.approx(want["p_holm"], rel=1e-6)
    # A finished workdir returns its results without redoing anything; an edited one is refused.
    again = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0 and "verdicts" in again.stdout
    edited = subprocess.run(
        [*command, "--config.classifier.optim.lr=0.5"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "classifier.optim.lr" in harness.last_error(edited, 2)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("arms", ("real_scarce", "gan"), r"config\.arms: .*unknown: \['gan'\]"),
        ("data.val_split", "test", "data.val_split"),
        ("quality.real_split", "test", "quality.real_split"),
        ("scarcity.fraction", 0.0, "scarcity.fraction"),
        ("anomaly.generators", "borrowed", "anomaly.generators"),
        ("generators", "borrowed", "generators"),
        ("filter.keep", 0.0, "filter.keep"),
        ("classifier.train.global_batch_size", 0, "config.classifier.train.global_batch_size"),
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
    arms = [name for name in runs if name.startswith("arms/")]
    assert len(arms) == len(config.arms) * config.seeds
    # The headroom arms run first, before the judge and any generator.
    order = list(runs)
    assert order.index("arms/real_full/seed0") < order.index("judge") < order.index("pggan")
    for name, (kind, _, sub) in runs.items():
        if name.startswith("arms/"):
            arm = name.split("/")[1]
            assert bool(sub.data.keep_class) == (arm != "real_full")
            assert bool(sub.data.synthetic.manual_dir) == bool(experiment.design.arm_generator(arm))
            assert sub.data.augment.enabled == (arm == "augmented")
            assert (sub.data.oversample.balance > 0) == (arm == "oversampled")
            assert (sub.loss.class_weighting == "balanced") == (arm == "balanced_loss")
            assert sub.data.name == config.data.name
            assert sub.train.num_steps == config.classifier.train.num_steps
        if kind in ("pggan", "ddpm") and not name.startswith("anomaly/"):
            assert sub.data.keep_class == config.scarcity.class_name
    if preset == "nih14_224":  # multi-label: unconditional generators of the rare finding
        assert runs["pggan"][2].data.only_class == "Hernia"
        assert runs["arms/pggan/seed0"][2].data.synthetic.label == "Hernia"


def test_target_scores_and_headline_for_each_label_kind():
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


def _edited(results, edit):
    import copy

    out = copy.deepcopy(results)
    edit(out)
    return out


def test_every_report_warning_has_its_trigger(smoke_run):
    from cxrjax.experiment import report

    base = smoke_run["results"]

    def no_headroom(r):
        r["headroom"]["sufficient"] = False

    def few_seeds(r):
        r["config"]["seeds"] = 3

    def small_test(r):
        r["dataset"]["class_counts"]["test"]["normal"] = 40

    def inadequate(r):
        gate = r["quality"]["ddpm"]["gate"]
        gate.update(adequate=False, failed_classes=["normal"])

    def rank_deficient(r):
        r["quality"]["pggan"]["distance_matrix"]["min_images"] = [[3, 3], [3, 3]]

    def short_filter(r):
        r["quality"]["pggan"]["filter"].update(shortfall=7, max_attempts=10)

    def inverted(r):
        r["anomaly"]["ddpm"]["warnings"] = ["pixels-space score is below chance on validation"]

    def shipped(r):
        r["generators"]["pggan"]["source"] = "shipped"

    triggers = {
        no_headroom: "No headroom",
        few_seeds: "Only 3 seeds",
        small_test: "Small test classes (normal: 40",
        inadequate: "DDPM is not adequate at this budget",
        rank_deficient: "rank-deficient covariances",
        short_filter: "7 images short",
        inverted: "below chance on validation",
        shipped: "Shipped generators were used (pggan)",
    }

    def clean(r):  # no condition holds: no warning at all
        r["headroom"]["sufficient"] = True
        r["config"]["seeds"] = 5
        for q in r["quality"].values():
            q["gate"].update(adequate=True, failed_classes=[])
            q["distance_matrix"]["min_images"] = [[10_000] * 2] * 2
            q["filter"]["shortfall"] = 0
        for entry in r["anomaly"].values():
            entry["warnings"] = []
        for g in r["generators"].values():
            g["source"] = "trained"

    base = _edited(base, clean)
    assert report.warnings_list(base) == []
    for edit, phrase in triggers.items():
        assert any(phrase in w for w in report.warnings_list(_edited(base, edit))), phrase


def test_report_text_follows_the_config(smoke_run):
    from cxrjax.experiment import figures, report

    base = smoke_run["results"]

    def text(r):
        return report.markdown(r, {}, figures.caption)

    plain = text(base)
    assert "95 % CI" in plain and "best validation ROC-AUC" in plain

    def level(r):
        r["config"]["eval"]["confidence"] = 0.9

    def last(r):
        r["config"]["classifier"]["train"]["select"] = "last"

    def model(r):
        r["classifier_model"] = {"name": "densenet121", "parameters": 6_955_906}

    def split_shift(r):  # clearly better on validation, worse on test
        c = r["evaluation"]["comparisons"][0]
        c["val"].update(mean=0.03, ci=[0.01, 0.05])
        c["paired_t"]["mean"] = -0.01

    def split_agree(r):
        c = r["evaluation"]["comparisons"][0]
        c["val"].update(mean=0.03, ci=[0.01, 0.05])
        c["paired_t"]["mean"] = 0.01

    def gate_passed_and_val(ci):
        def edit(r):
            for c in r["evaluation"]["comparisons"]:
                if c.get("primary"):
                    c["val"].update(mean=sum(ci) / 2, ci=ci)
            for q in r["quality"].values():
                q["gate"].update(adequate=True, failed_classes=[])

        return edit

    lost = text(_edited(base, gate_passed_and_val([-0.03, -0.01])))
    assert "But validation already showed the loss (-0.020, CI [-0.030, -0.010])" in lost
    fine = text(_edited(base, gate_passed_and_val([-0.01, 0.03])))
    assert "Passing the gate does not make a generator useful" not in fine

    first = base["evaluation"]["comparisons"][0]
    disagree = f"Validation and test disagree for {report.label(first['arm'])}"
    assert disagree in text(_edited(base, split_shift))
    assert disagree not in text(_edited(base, split_agree))
    assert "| val diff per seed |" in plain
    assert "90 % CI" in text(_edited(base, level)) and "95 % CI" not in text(_edited(base, level))
    assert "the last checkpoint" in text(_edited(base, last))
    assert "densenet121 (6,955,906 parameters)" in text(_edited(base, model))


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_fault_matrix_edit_after_interruption_is_refused_naming_the_field(
    smoke_run, shipped_data_dir, tmp_path, stage
):
    """Interrupted in stage k (its and later sub-runs' outputs gone), then re-run with an edited
    field: refused before any work, the field named, nothing written."""
    from cxrjax.experiment import design
    from cxrjax.train import workdir as workdir_lib

    source = smoke_run["workdir"]
    workdir = tmp_path / "smoke"
    shutil.copytree(source, workdir, ignore=_top_level("results.json", "report.md", "figures"))
    config = experiment_configs.get_config("smoke")
    config.data.data_dir = shipped_data_dir
    for name, (_, sub_workdir, _) in experiment.plan(config, str(source)).items():
        if design.stage_of(name) >= stage:
            shutil.rmtree(workdir / os.path.relpath(sub_workdir, source), ignore_errors=True)
    before = sorted(str(p) for p in workdir.rglob("*"))
    config.classifier.optim.lr = 0.5
    with pytest.raises(workdir_lib.WorkdirConfigError, match="classifier.optim.lr"):
        experiment.run(config, str(workdir))
    assert sorted(str(p) for p in workdir.rglob("*")) == before


# What an interruption in each stage leaves unfinished (stage 3: the SIGTERM test above).
UNFINISHED = {
    1: ("arms/real_full/seed1",),
    2: ("synthetic", "quality", "cas"),
    4: ("anomaly",),
}


@pytest.mark.parametrize("stage", sorted(UNFINISHED))
def test_fault_matrix_interrupted_run_finishes_like_an_uninterrupted_one(
    smoke_run, shipped_data_dir, tmp_path, stage
):
    source = smoke_run["workdir"]
    workdir = tmp_path / "smoke"
    shutil.copytree(source, workdir, ignore=_top_level("results.json", "report.md", "figures"))
    for path in UNFINISHED[stage]:
        shutil.rmtree(workdir / path)
    for path in ("arms/real_scarce/seed0", "judge", "pggan"):
        assert (workdir / path / "results.json").exists()  # kept: finished before the stop
    done = subprocess.run(
        _command(workdir, shipped_data_dir), cwd=REPO, env=_env(), capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    results = json.loads((workdir / "results.json").read_text())
    expected = smoke_run["results"]
    assert experiment.check_results(results) == []
    for arm in experiment.ARMS:
        for got, want in zip(
            results["arms"][arm]["per_seed"], expected["arms"][arm]["per_seed"], strict=True
        ):
            assert _flat(got["test"]) == pytest.approx(_flat(want["test"]), rel=1e-6)
    for method in ("fanogan", "ddpm"):
        got, want = results["anomaly"][method]["test"], expected["anomaly"][method]["test"]
        assert _flat(got) == pytest.approx(_flat(want), rel=1e-6)
    for kind in ("pggan", "ddpm"):
        got, want = results["quality"][kind], expected["quality"][kind]
        assert got["class_fidelity"] == want["class_fidelity"]
        np.testing.assert_allclose(got["distance_matrix"]["fd"], want["distance_matrix"]["fd"])
    for got, want in zip(
        results["evaluation"]["comparisons"], expected["evaluation"]["comparisons"], strict=True
    ):
        assert got["p_holm"] == pytest.approx(want["p_holm"], rel=1e-6)


@pytest.mark.parametrize("alias", ["val", "valid", "validation"])
def test_every_validation_alias_passes_the_split_checks(smoke_run, alias):
    """The drivers record "val"; a config naming the split by any accepted alias must agree."""
    import copy

    results = copy.deepcopy(smoke_run["results"])
    results["split_use"]["val_split"] = alias
    results["config"]["data"]["val_split"] = alias
    assert experiment.check_results(results) == []
    results["split_use"]["threshold"]["anomaly/ddpm"] = "test"
    assert any("not validation" in p for p in experiment.check_results(results))
    config = experiment_configs.get_config("smoke")
    config.data.update(val_split=alias, test_split="validation" if alias != "validation" else "val")
    with pytest.raises(config_lib.ConfigError, match="data.val_split"):
        experiment.validate(config)
