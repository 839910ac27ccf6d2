"""Anomaly runs on tiny generator workdirs: config errors before compute, the encoder's loss
falls and resumes exactly, the launcher end to end (f-AnoGAN), and the DDPM scorer."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from configs import anomaly as anomaly_configs
from configs import ddpm as ddpm_configs
from configs import pggan as pggan_configs
from cxrjax import anomaly, parallel
from cxrjax import checkpoint as checkpoint_lib
from cxrjax import config as config_lib
from cxrjax.data import builders
from cxrjax.metrics import classification as cls_metrics
from cxrjax.train import anomaly_run, diffusion_run, gan_run, loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def pggan_workdir(shipped_data_dir, tmp_path_factory):
    """A tiny conditional PGGAN grown to 8x8 (3 steps of 16) on the shipped data."""
    config = pggan_configs.get_config("tiny")
    config.data.data_dir = shipped_data_dir
    config.data.resolution = 8
    config.schedule.update(fade_images=16, stable_images=16)
    workdir = str(tmp_path_factory.mktemp("pggan"))
    gan_run.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def ddpm_workdir(shipped_data_dir, tmp_path_factory):
    """A tiny conditional DDPM (16 px), 1 step, trained on the normal class only."""
    config = ddpm_configs.get_config("tiny")
    config.data.data_dir = shipped_data_dir
    config.data.only_class = "normal"
    config.train.update(num_steps=1, checkpoint_every=0, sample_every=0)
    config.sample.update(steps=1, per_class=1)
    workdir = str(tmp_path_factory.mktemp("ddpm"))
    results = diffusion_run.train_and_evaluate(config, workdir)
    return workdir, results


def tiny_config(generator_workdir, overrides=None, **fields):
    config = anomaly_configs.get_config("tiny")
    config.generator_workdir = generator_workdir
    for dotted, value in {**(overrides or {}), **fields}.items():
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "gan"}, "config.method"),
        ({"generator_workdir": ""}, "generator_workdir: is required"),
        ({"generator_workdir": "/nonexistent/pggan"}, "does not exist"),
        ({"method": "ddpm"}, "holds a pggan run but method 'ddpm' needs a ddpm run"),
        ({"data.normal_class": "cardiomegaly"}, "normal_class: 'cardiomegaly' is not a class"),
        ({"encoder.output": "sigmoid"}, "encoder.output"),
        ({"ddpm.steps": 50}, "ddpm.steps"),
        ({"eval.primary": "features"}, "eval.primary: 'features' needs config.eval.features"),
        ({"eval.features": "bogus:x"}, "eval.features: unknown feature extractor"),
        ({"eval.features": "cxr:/no/such/classifier"}, "eval.features: .* does not exist"),
    ],
)
def test_bad_config_fails_before_compute(pggan_workdir, tmp_path, monkeypatch, overrides, message):
    def no_compute(*args, **kwargs):
        raise AssertionError("a generator was restored or a step run before validation")

    monkeypatch.setattr(anomaly, "load_generator_run", no_compute)
    monkeypatch.setattr(loop, "run", no_compute)
    config = tiny_config(pggan_workdir, overrides)
    with pytest.raises(config_lib.ConfigError, match=message):
        anomaly_run.train_and_evaluate(config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd" / "config.json").exists()


def _encoder_setup(config):
    """What train_and_evaluate hands train_encoder: generator run, train split, normal label."""
    mesh = parallel.make_mesh()
    run_config = anomaly_run.check_generator(config)
    name, options = anomaly_run.data_options(config, run_config)
    source, spec = builders.load(name, "train", **options)
    run = anomaly.load_generator_run(config.generator_workdir, "pggan", mesh)
    label = anomaly.class_label("normal", run.spec.class_names, True)
    return run, source, spec, mesh, label


def _checkpoint(workdir):
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step()
    state, _ = ckpt.restore(step, None)
    data = json.loads((ckpt.directory / str(step) / "data" / "process_0-of-1.json").read_text())
    ckpt.close()
    return step, state, data


def test_encoder_loss_falls_and_resume_is_exact(pggan_workdir, tmp_path):
    config = tiny_config(pggan_workdir, {"train.log_every": 1})
    run, source, spec, mesh, label = _encoder_setup(config)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    full = anomaly_run.train_encoder(config, straight, run, source, spec, mesh, label)
    losses = full["summary"]["losses"]
    assert full["finished"] and sorted(losses, key=int) == [str(s) for s in range(1, 7)]
    assert losses["6"] < 0.9 * losses["1"], losses  # the izi_f loss falls on a tiny generator
    assert full["summary"]["normal_train_records"] == len(
        anomaly.mixing.class_indices(anomaly.mixing.read_labels(source), "normal", spec.class_names)
    )

    partial = anomaly_run.train_and_evaluate(config, resumed, stop_at=3)
    assert partial == {"finished": False, "step": 3, "preempted": False}
    assert not os.path.exists(os.path.join(resumed, "results.json"))
    again = anomaly_run.train_encoder(config, resumed, run, source, spec, mesh, label)
    assert again["summary"]["start_step"] == 3 and again["step"] == 6
    step_a, state_a, data_a = _checkpoint(straight)
    step_b, state_b, data_b = _checkpoint(resumed)
    assert step_a == step_b == 6 and data_a == data_b  # same next batch
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert again["summary"]["losses"]["6"] == pytest.approx(losses["6"], abs=1e-6)


@pytest.fixture(scope="module")
def launched(pggan_workdir, tmp_path_factory):
    """`python -m launch.train_anomaly --config=configs/anomaly.py:tiny` on the tiny PGGAN."""
    workdir = tmp_path_factory.mktemp("anomaly") / "wd"
    command = [
        sys.executable,
        "-m",
        "launch.train_anomaly",
        "--config=configs/anomaly.py:tiny",
        f"--workdir={workdir}",
        f"--config.generator_workdir={pggan_workdir}",
    ]
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_PLATFORMS="cpu",
        # The settings conftest gives this process: fast compiles and the shared compile cache.
        JAX_DISABLE_MOST_OPTIMIZATIONS="true",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    )
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return workdir, done


def test_train_anomaly_entry_point_tiny(launched):
    workdir, done = launched
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    results = json.loads((workdir / "results.json").read_text())
    assert summary["method"] == "fanogan" and summary["test"]["auc"] == results["test"]["auc"]
    for name in ("config.json", "results.md", "roc.png", "residuals.png", "metrics.jsonl"):
        assert (workdir / name).stat().st_size > 0, name
    assert results["training"]["final_step"] == 6
    assert results["scorer"]["encoder_step"] == 6 and results["scorer"]["generator_step"] == 3
    assert results["dataset"]["abnormal_classes"] == ["pneumonia"]
    val, test = (np.load(workdir / f"{s}_scores.npz") for s in ("val", "test"))
    assert len(val["score"]) == 270 and len(test["score"]) == 468  # every record, once
    np.testing.assert_array_equal(test["y"], (test["label"] != 0).astype(int))
    assert results["test"]["auc"] == pytest.approx(skm.roc_auc_score(test["y"], test["score"]))
    assert results["threshold"] == pytest.approx(
        cls_metrics.select_threshold(val["y"], val["score"], "youden")
    )
    lo, hi = results["test"]["auc_ci"]
    assert lo <= results["test"]["auc"] <= hi
    assert set(results["terms"]) == {"residual", "feature"}


def test_finished_run_returns_saved_results(launched, pggan_workdir, monkeypatch):
    workdir, _ = launched
    monkeypatch.setattr(anomaly_run, "train_encoder", lambda *a, **k: 1 / 0)
    config = tiny_config(pggan_workdir)
    saved = json.loads((workdir / "results.json").read_text())
    assert anomaly_run.train_and_evaluate(config, str(workdir)) == saved


def test_load_scorer_reproduces_saved_scores(launched, shipped_data_dir):
    workdir, _ = launched
    scorer = anomaly.load_scorer("fanogan", str(workdir))
    source, spec = builders.load("pneumonia_mnist", "test", data_dir=shipped_data_dir)
    first = anomaly.mixing.Part(source, indices=np.arange(16))
    scored = anomaly.score_split(scorer, first, spec, batch_size=16)
    saved = np.load(workdir / "test_scores.npz")
    np.testing.assert_allclose(scored["score"], saved["score"][:16], rtol=1e-4)
    images = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
    scores, maps = scorer(images)
    assert scores.shape == (4,) and maps.shape == (4, 8, 8) and np.all(maps >= 0)
    np.testing.assert_array_equal(scorer(images)[0], scores)
    with pytest.raises(config_lib.ConfigError, match="not an f-AnoGAN encoder run"):
        anomaly.load_scorer("fanogan", scorer.info["generator_workdir"])


def test_ddpm_scorer_and_evaluation(ddpm_workdir, shipped_data_dir, tmp_path):
    workdir, trained = ddpm_workdir
    source, spec = builders.load("pneumonia_mnist", "train", data_dir=shipped_data_dir)
    labels = anomaly.mixing.read_labels(source)
    assert trained["dataset"]["train_records"] == int(np.sum(labels == 0)) < len(labels)
    scorer = anomaly.load_scorer("ddpm", workdir, t_star=20, steps=2)
    images = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 1)).astype(np.float32)
    scores, maps = scorer(images)
    assert scores.shape == (4,) and maps.shape == (4, 16, 16)
    np.testing.assert_array_equal(scorer(images)[0], scores)
    # Record i's noise is keyed by its index (default: batch position), not its position.
    flipped, _ = scorer(images[::-1], indices=np.arange(4, dtype=np.int32)[::-1])
    np.testing.assert_allclose(flipped[::-1], scores, rtol=1e-5)
    moved, _ = scorer(images, indices=np.arange(4, 8, dtype=np.int32))
    assert not np.allclose(moved, scores, rtol=1e-6)
    with pytest.raises(config_lib.ConfigError, match="t_star"):
        anomaly.load_scorer("ddpm", workdir, t_star=5000)
    # Another t* (a validation grid): the same compiled function, other scores.
    other = anomaly.load_scorer("ddpm", workdir, t_star=40, steps=2)
    compiled = scorer._outputs._cache_size()
    assert other._outputs is scorer._outputs
    assert not np.allclose(other(images)[0], scores)
    assert scorer._outputs._cache_size() == compiled

    config = tiny_config(workdir, method="ddpm")
    results = anomaly_run.train_and_evaluate(config, str(tmp_path / "wd"))
    assert results["method"] == "ddpm" and results["scorer"]["t_star"] == 20
    assert 0.0 <= results["test"]["auc"] <= 1.0 and "training" not in results
    assert (tmp_path / "wd" / "residuals.png").stat().st_size > 0
    assert not (tmp_path / "wd" / "checkpoints").exists()  # nothing to train


@pytest.mark.parametrize("preset", ["tiny", "pneumonia_mnist", "pneumonia_mnist_ddpm"])
def test_presets_validate(preset):
    config = anomaly_configs.get_config(preset)
    assert bool(config.generator_workdir) == (preset != "tiny")  # tiny: given by the caller
    config.generator_workdir = config.generator_workdir or "/some/run"
    anomaly_run.validate(config)


@pytest.fixture(scope="module")
def classifier_workdir(shipped_data_dir, tmp_path_factory):
    """A tiny train_classifier workdir (config.json + one untrained checkpoint) for cxr:."""
    import functools

    from configs import classifier as classifier_configs
    from cxrjax.train import classifier, optim

    workdir = str(tmp_path_factory.mktemp("classifier"))
    config = classifier_configs.get_config("tiny")
    config.data.data_dir = shipped_data_dir
    config_lib.save_json(config, os.path.join(workdir, "config.json"))
    model = classifier.make_model(config.model, 2)
    tx, _ = optim.make_optimizer(config.optim, int(config.train.num_steps))
    size = int(config.data.resolution)
    init_fn = functools.partial(
        classifier.init_state, model, tx, image_shape=(size, size, 1), use_ema=False
    )
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), best_metric="val/auc", async_save=False
    )
    checkpointer.save(1, jax.jit(init_fn)(jax.random.PRNGKey(1)), metrics={"val/auc": 0.5})
    checkpointer.close()
    return workdir


def test_feature_space_scores_for_both_methods(
    pggan_workdir, ddpm_workdir, classifier_workdir, tmp_path
):
    """eval.features=cxr:<classifier>: f-AnoGAN and DDPM (t* from a validation grid) report
    pixel and feature spaces side by side, the top level being the primary (features)."""
    spec = f"cxr:{classifier_workdir}"
    fast = {"eval.features": spec, "eval.bootstrap": 10, "eval.num_examples": 1}
    runs = {
        "fanogan": tiny_config(pggan_workdir, {**fast, "train.num_steps": 2}),
        "ddpm": tiny_config(
            ddpm_workdir[0], {**fast, "method": "ddpm", "ddpm.t_star_grid": (10, 20)}
        ),
    }
    for method, config in runs.items():
        workdir = tmp_path / method
        results = anomaly_run.train_and_evaluate(config, str(workdir))
        saved = json.loads((workdir / "results.json").read_text())
        assert saved["primary_score"] == "features", method
        assert set(saved["scores"]) == {"pixels", "features"}, method
        assert saved["test"] == saved["scores"]["features"]["test"]
        assert saved["scorer"]["features"]["spec"] == spec
        assert isinstance(saved["warnings"], list)
        test = np.load(workdir / "test_scores.npz")
        np.testing.assert_array_equal(test["score"], test["score_features"])
        auc = skm.roc_auc_score(test["y"], test["score_pixels"])
        assert saved["scores"]["pixels"]["test"]["auc"] == pytest.approx(auc)
        assert results["scores"]["features"]["val"]["auc"] == saved["val"]["auc"]
    selection = saved["t_star_selection"]  # the DDPM run
    assert selection["grid"] == [10, 20] and selection["space"] == "features"
    aucs = {int(t): v["features"] for t, v in selection["val_auc"].items()}
    assert selection["chosen"] == max(aucs, key=aucs.get)
    assert saved["scorer"]["t_star"] == saved["t_star"] == selection["chosen"]
    assert saved["t_star_grid"] == [10, 20]
    assert saved["val"]["auc"] == pytest.approx(aucs[selection["chosen"]])
