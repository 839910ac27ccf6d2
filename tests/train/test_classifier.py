"""Classifier: losses against numpy, config validation, device-count invariance, exact resume."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import configs.classifier as classifier_configs
from cxrjax import checkpoint as checkpoint_lib
from cxrjax import config as config_lib
from cxrjax import parallel
from cxrjax.data import pipeline, sources
from cxrjax.train import classifier, classifier_run, optim

BINARY = sources.DatasetSpec("toy", ("normal", "pneumonia"))
MULTILABEL = sources.DatasetSpec("toy14", tuple(f"f{i}" for i in range(3)), sources.MULTILABEL)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(data_dir, **train):
    config = classifier_configs.get_config("tiny")
    config.data.data_dir = data_dir
    config.train.update(train)
    return config


def test_multiclass_loss_matches_numpy_with_weights_and_smoothing():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 2)).astype(np.float32)
    labels = np.array([0, 1, 1, 0, 1, 1])
    mask = np.array([1, 1, 1, 1, 1, 0], bool)
    weights = classifier.class_weights(BINARY, labels, "balanced")
    np.testing.assert_allclose(weights, [6 / (2 * 2), 6 / (2 * 4)])
    loss = classifier.make_loss_fn(BINARY, weights, label_smoothing=0.1)(logits, labels, mask)
    targets = np.eye(2)[labels] * 0.9 + 0.05
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    per_example = -(targets * log_p).sum(-1) * weights[labels]
    np.testing.assert_allclose(loss, per_example[mask].mean(), rtol=1e-5)


def test_multilabel_loss_uses_positive_weights():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 3)).astype(np.float32)
    labels = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0], [1, 1, 0], [0, 0, 0]], np.float32)
    weights = classifier.class_weights(MULTILABEL, labels, "balanced")
    np.testing.assert_allclose(weights, [3 / 2, 4 / 1, 4 / 1])
    loss = classifier.make_loss_fn(MULTILABEL, weights)(logits, labels, np.ones(5, bool))
    p = 1 / (1 + np.exp(-logits))
    expected = -(weights * labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("data.name", "chexpert", "data.name"),
        ("model.name", "resnet50", "model.name"),
        ("train.global_batch_size", 0, "train.global_batch_size"),
        ("optim.ema_decay", 1.5, "optim.ema_decay"),
        ("model.stem", "huge", "model.stem"),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, monkeypatch, field, value, message):
    config = tiny_config(str(tmp_path))
    node = config
    *parents, leaf = field.split(".")
    for part in parents:
        node = node[part]
    with node.ignore_type():
        node[leaf] = value

    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the config was validated")

    monkeypatch.setattr(classifier_run, "load_splits", no_data)
    with pytest.raises(config_lib.ConfigError, match=message):
        classifier_run.train_and_evaluate(config, str(tmp_path / "wd"))


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path, monkeypatch):
    config = tiny_config(str(tmp_path))
    config.train.global_batch_size = 6  # 4 fake devices in tests
    monkeypatch.setattr(classifier_run, "load_splits", lambda *a: pytest.fail("read data"))
    with pytest.raises(ValueError, match="multiple of the device count 4"):
        classifier_run.train_and_evaluate(config, str(tmp_path / "wd"))


def _loss_curve(devices, batches, config, spec):
    mesh = parallel.make_mesh(devices)
    model = classifier.make_model(config.model, spec.num_classes)
    tx, schedule = optim.make_optimizer(config.optim, 10)
    init = lambda rng: classifier.init_state(model, tx, rng, (28, 28, 1), use_ema=True)  # noqa: E731
    rng = jax.random.PRNGKey(0)
    abstract = jax.eval_shape(init, rng)
    loss_fn = classifier.make_loss_fn(spec, np.ones(2, np.float32))
    step, _ = classifier.compile_steps(
        model, tx, loss_fn, schedule, mesh, abstract, ema_decay=0.9, label_kind=spec.label_kind
    )
    state = jax.jit(init, out_shardings=parallel.replicated(mesh))(rng)
    losses = []
    for i, batch in enumerate(batches):
        state, metrics = step(state, parallel.host_to_global(batch, mesh), jax.random.PRNGKey(i))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params), jax.device_get(state.batch_stats)


def test_one_device_and_four_devices_give_the_same_training(shipped_data_dir):
    from cxrjax.data import builders

    source, spec = builders.load("pneumonia_mnist", "train", data_dir=shipped_data_dir)
    config = tiny_config(shipped_data_dir)
    iterator = pipeline.make_train_iterator(
        source, spec, global_batch_size=16, seed=0, normalization=(0.5, 0.25), device_count=4
    )
    batches = [
        {k: v for k, v in next(iterator).items() if k in ("image", "label")} for _ in range(3)
    ]
    one = _loss_curve(jax.devices()[:1], batches, config, spec)
    four = _loss_curve(jax.devices()[:4], batches, config, spec)
    np.testing.assert_allclose(one[0], four[0], rtol=1e-5, atol=1e-6)
    assert one[0][-1] != one[0][0]  # it trains
    # Summation order differs across devices; Adam divides by sqrt(v), which turns float noise
    # in near-zero gradients into ~1e-5 parameter noise after a few lr=1e-3 steps.
    for a, b in zip(jax.tree.leaves(one[1:]), jax.tree.leaves(four[1:]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def _final_state(workdir):
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step()
    state, meta = ckpt.restore(step, None)
    data = json.loads((ckpt.directory / str(step) / "data" / "process_0-of-1.json").read_text())
    ckpt.close()
    return step, state, data


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {row["step"]: row["train/loss"] for row in map(json.loads, f) if "train/loss" in row}


def test_stop_and_resume_equals_uninterrupted(shipped_data_dir, tmp_path):
    config = tiny_config(
        shipped_data_dir, num_steps=8, log_every=2, eval_every=4, checkpoint_every=4, select="last"
    )
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    full = classifier_run.train_and_evaluate(config, straight)
    partial = classifier_run.train_and_evaluate(config, resumed, stop_at=4)
    assert partial == {"finished": False, "step": 4, "preempted": False}
    assert not os.path.exists(os.path.join(resumed, "results.json"))
    again = classifier_run.train_and_evaluate(config, resumed)  # fresh iterator, state, manager

    step_a, state_a, data_a = _final_state(straight)
    step_b, state_b, data_b = _final_state(resumed)
    assert step_a == step_b == 8
    assert data_a == data_b  # the iterator stands at the same next batch
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    losses_a, losses_b = _losses(straight), _losses(resumed)
    assert [losses_a[s] for s in (6, 8)] == [losses_b[s] for s in (6, 8)]
    assert again["test"]["auc"] == full["test"]["auc"]
    # A finished run is not re-evaluated: the same results come back, test is not re-read.
    assert classifier_run.train_and_evaluate(config, resumed)["test"] == again["test"]


def test_resume_with_a_different_batch_fails_naming_it(shipped_data_dir, tmp_path):
    config = tiny_config(
        shipped_data_dir, num_steps=4, checkpoint_every=2, eval_every=0, select="last"
    )
    classifier_run.train_and_evaluate(config, str(tmp_path), stop_at=2)
    config.train.global_batch_size = 8
    # Refused by the workdir check (#19) before anything is written, naming the field.
    with pytest.raises(config_lib.ConfigError, match=r"global_batch_size 16 -> 8.*force"):
        classifier_run.train_and_evaluate(config, str(tmp_path))


def test_train_classifier_entry_point(shipped_data_dir, tmp_path):
    workdir = tmp_path / "wd"
    command = [
        sys.executable,
        "-m",
        "launch.train_classifier",
        "--config=configs/classifier.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.data_dir={shipped_data_dir}",
    ]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    test = results["test"]
    for key in ("auc", "accuracy", "precision", "recall", "specificity", "f1"):
        assert 0.0 <= test[key] <= 1.0
        low, high = test[f"{key}_ci"]
        assert low <= test[key] <= high
    assert results["split_sizes"] == {"train": 2428, "val": 270, "test": 468}
    assert (workdir / "roc.png").stat().st_size > 0
    assert "| test" in (workdir / "results.md").read_text()
    assert (workdir / "config.json").exists() and (workdir / "metrics.jsonl").exists()
    assert any(p.startswith("events") for p in os.listdir(workdir / "tensorboard"))

    bad = subprocess.run(
        [*command[:-1], "--config.data.name=nope"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "config.data.name" in bad.stderr


def test_sigterm_saves_the_current_step_and_the_same_command_resumes(shipped_data_dir, tmp_path):
    import signal
    import time

    workdir = tmp_path / "wd"
    command = [
        sys.executable, "-m", "launch.train_classifier", "--config=configs/classifier.py:tiny",
        f"--workdir={workdir}", f"--config.data.data_dir={shipped_data_dir}",
        "--config.train.num_steps=150", "--config.train.checkpoint_every=0",
        "--config.train.eval_every=0", "--config.train.select=last", "--config.train.log_every=1",
    ]  # fmt: skip
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 3
    ):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "preempted (SIGTERM) at step" in output and "re-run the same command" in output
    ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints")
    step = ckpt.latest_step()
    ckpt.close()
    assert step is not None and 3 <= step < 150
    assert not (workdir / "results.json").exists()
    # The same command resumes from that step (no step is trained twice) and finishes.
    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 151)), "steps repeated or skipped across the resume"
    assert json.loads((workdir / "results.json").read_text())["num_steps"] == 150


def test_runs_of_one_computation_share_their_jitted_steps():
    """An experiment's ~50 classifier sub-runs: same model/optimizer/loss -> one jitted step
    (no re-trace); anything the step closes over (weights, lr, model) -> a new one."""
    config = classifier_configs.get_config("tiny")
    mesh = parallel.make_mesh()
    model = classifier.make_model(config.model, BINARY.num_classes)
    tx, schedule = optim.make_optimizer(config.optim, int(config.train.num_steps))
    init = lambda rng: classifier.init_state(model, tx, rng, (28, 28, 1), use_ema=True)  # noqa: E731
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    ones = np.ones(2, np.float32)

    def steps(config, weights=ones):
        return classifier_run._compile(config, BINARY, model, tx, schedule, mesh, abstract, weights)

    first = steps(config)
    other_seed = config.copy_and_resolve_references()
    other_seed.seed = 7
    other_seed.data.keep_seed = 3
    assert steps(other_seed) is first
    assert steps(config, np.array([1.0, 3.0], np.float32)) is not first
    faster = config.copy_and_resolve_references()
    faster.optim.lr = 2 * config.optim.lr
    assert steps(faster) is not first
    assert steps(config) is first
