"""Classifier runs: train-and-evaluate with resume, checkpoint selection, one test read.

The steps themselves live in `cxrjax.train.classifier` (importable without the data stack);
this module wires them to the data pipeline, the shared loop, Orbax checkpoints and the
metrics, and writes the results.
"""

from __future__ import annotations

import collections
import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cxrjax import chexnet, fileio, parallel, report
from cxrjax import config as config_lib
from cxrjax.data import builders, mixing, pipeline, sources
from cxrjax.metrics import calibration
from cxrjax.metrics import classification as cls_metrics
from cxrjax.train import classifier as classifier_lib
from cxrjax.train import job as job_lib
from cxrjax.train import loop, optim, runs
from cxrjax.train import results as results_lib
from cxrjax.train.classifier import (
    class_weights,
    compile_steps,
    init_state,
    make_loss_fn,
    make_model,
)
from cxrjax.train.classifier_checks import RULES, validate  # noqa: F401 (public names)


def predict_split(predict, state, batches, mesh) -> dict[str, np.ndarray]:
    """Runs `predict` over an eval iterator; returns host arrays of the unpadded examples.

    Works unchanged across processes: each process feeds its shard, `to_host` gathers the
    global arrays, and the padding rows (mask = False) are dropped.
    """
    chunks: dict[str, list[np.ndarray]] = {"probs": [], "labels": [], "index": []}
    for batch in batches:
        arrays = loop.device_batch(batch, mesh)
        host = parallel.to_host(
            {
                "probs": predict(state, arrays["image"]),
                "labels": arrays["label"],
                "mask": arrays["mask"],
                "index": arrays["index"],
            }
        )
        keep = np.asarray(host["mask"], bool)
        for key in chunks:
            chunks[key].append(np.asarray(host[key])[keep])
    out = {key: np.concatenate(values) for key, values in chunks.items()}
    # Record order, whatever the process count: gathered batches interleave the processes.
    order = np.argsort(out["index"], kind="stable")
    out = {key: value[order] for key, value in out.items()}
    out["probs"] = out["probs"].astype(np.float64)
    return out


# ----------------------------------------------------------------------------- driver
def load_splits(data) -> tuple[dict[str, Any], sources.DatasetSpec]:
    """Prepares (idempotently) and opens the train/val/test splits of the configured dataset."""
    options = runs.dataset_options(data)
    builders.prepare(data.name, **options)
    splits, spec = {}, None
    for role in ("train", "val", "test"):
        splits[role], spec = builders.load(data.name, data[f"{role}_split"], **options)
    return splits, spec


# Classifier data-config fields that enter the run signature's dataset string when active
# rather than the config hash, so runs from before they existed still resume.
SIGNATURE_DATA_FIELDS = (*mixing.SUBSET_FIELDS, "data.synthetic", "data.oversample")
# Fields outside the config hash that checks a resumed run is the same run.
HASH_IGNORE = (
    "train.log_every",
    *config_lib.THROUGHPUT_FIELDS,
    "eval.bootstrap",
    "eval.figures",
    *SIGNATURE_DATA_FIELDS,
    *pipeline.POLICY_FIELDS,
)


def _synthetic_active(data) -> bool:
    synthetic = data.get("synthetic")
    return synthetic is not None and bool(synthetic.manual_dir)


def load_synthetic(data, spec: sources.DatasetSpec) -> tuple[list[mixing.Part], list, dict]:
    """Every split of the synthetic image folder as synthetic Parts, labels in `spec`'s classes.

    Returns (parts, per-part labels, description). The folder is prepared (idempotently) as an
    image_folder dataset at data.resolution; class folders map to the real classes by name,
    or all to `data.synthetic.label` when set (one-hot rows for multi-label data).
    """
    synthetic = data.synthetic
    options = {
        "data_dir": synthetic.data_dir or data.data_dir or None,
        "manual_dir": os.path.abspath(os.path.expanduser(synthetic.manual_dir)),
        "resolution": data.resolution,
        "folder_name": synthetic.folder_name or None,
    }
    builder = builders.prepare("image_folder", **options)
    own = builders.spec(builder)
    multilabel = spec.label_kind == sources.MULTILABEL

    def row(name: str, field: str):
        config_lib.check(
            name in spec.class_names,
            field,
            f"synthetic class {name!r} is not a class of {spec.name} {list(spec.class_names)}",
        )
        index = spec.class_names.index(name)
        return np.eye(spec.num_classes, dtype=np.float32)[index] if multilabel else index

    if synthetic.label:
        table = np.stack(
            [np.asarray(row(synthetic.label, "data.synthetic.label"))] * len(own.class_names)
        )
    else:
        table = np.stack([np.asarray(row(n, "data.synthetic.manual_dir")) for n in own.class_names])
    parts, labels = [], []
    for split in sorted(builder.info.splits):
        if not builder.info.splits[split].num_examples:
            continue
        source = mixing.Relabelled(builder.as_data_source(split=split), table)
        name = f"synthetic ({own.name}, {split} part)"
        parts.append(mixing.Part(source, name=name, synthetic=True))
        labels.append(table[mixing.read_labels(source.source)])
    if not parts:
        raise config_lib.ConfigError(
            f"config.data.synthetic.manual_dir: {synthetic.manual_dir} holds no images"
        )
    description = {
        "dataset": own.name,
        "folder": options["manual_dir"],
        "splits": sorted(builder.info.splits),
        "provenance": builder.info.metadata.get("provenance"),
    }
    return parts, labels, description


def training_source(config, splits, spec) -> tuple[Any, np.ndarray, dict[str, Any], str]:
    """The training records: the (scarce) real train split, plus synthetic images if set.

    Returns (source, its labels, a description of what it holds, signature suffix). Only
    data.train_split and the synthetic folder can enter: the test split never trains.
    """
    data = config.data
    full_labels = mixing.read_labels(splits["train"])
    real = mixing.training_subset(splits["train"], spec, data, labels=full_labels)
    real_part = real if isinstance(real, mixing.Part) else mixing.Part(real, name="real")
    suffix = mixing.subset_signature(data)
    description: dict[str, Any] = {"real_split": data.train_split, "synthetic": None}
    real_parts = [real_part]
    repeats, description["oversampled"] = mixing.oversample_config(
        real_part, full_labels, data, spec.class_names, seed=int(config.seed)
    )
    if repeats is not None:
        real_parts.append(repeats)
        suffix += f"+oversample={data.keep_class}:{description['oversampled']['target']}"
    if not _synthetic_active(data):
        source = mixing.MixedSource(real_parts)
        labels = source.select_labels([full_labels] * len(real_parts))
    else:
        synth = data.synthetic
        parts, synth_labels, description["synthetic"] = load_synthetic(data, spec)
        amount = {"fraction": float(synth.fraction)} if synth.fraction else None
        if amount is None:
            available = sum(len(p) for p in parts)
            amount = {"count": int(synth.count) if synth.count else available}
        try:
            real_in = [] if synth.get("only", False) else real_parts
            source = mixing.mix(real_in, parts, seed=int(config.seed), **amount)
        except ValueError as error:
            raise config_lib.ConfigError(f"config.data.synthetic: {error}") from None
        labels = source.select_labels([full_labels] * len(real_in) + list(synth_labels))
        description["synthetic"]["amount"] = amount
        suffix += (
            f"+synthetic={description['synthetic']['dataset']}"
            f":{','.join(f'{k}={v}' for k, v in amount.items())}:label={synth.label}"
            + (":only" if synth.get("only", False) else "")
        )
    description["parts"] = mixing.part_composition(source, labels, spec.class_names)
    description["records"] = int(len(source))
    return source, labels, description, suffix


def training_splits(data, synthetic: bool) -> list[str]:
    """The splits a run trains on: the real train split (unless synthetic-only) and "synthetic"."""
    real = [] if data.get("synthetic", {}).get("only") else [data.train_split]
    return real + (["synthetic"] if synthetic else [])


def headline_auc(result: Mapping[str, Any]) -> float:
    """The single AUC that ranks checkpoints: binary AUC, else the macro average."""
    if "auc" in result:
        return float(result["auc"])
    return float(result["macro"]["auc"])


# Jitted (train_step, predict) pairs of this process, by everything they close over: an
# experiment trains ~50 classifiers of one computation, and a reused jitted function is
# neither traced nor compiled again (about 3 s a run on the 2-core CPU). A few entries: sub-runs
# of other shapes (judge, CAS, arms) alternate.
_COMPILED: collections.OrderedDict[str, tuple[Any, Any]] = collections.OrderedDict()
_COMPILED_MAX = 4


def _compile_key(config, spec, weights, mesh, abstract) -> str:
    """What the jitted steps depend on: model, optimizer and schedule, loss, label kind,
    mesh and the state's structure (never the data or the seed)."""
    return json.dumps(
        {
            "model": config_lib.to_dict(config.model),
            "optim": config_lib.to_dict(config.optim),
            "num_steps": int(config.train.num_steps),
            "loss": [np.asarray(weights).tolist(), float(config.loss.label_smoothing)],
            "spec": [spec.num_classes, spec.label_kind],
            "mesh": [mesh.axis_names, np.asarray(mesh.device_ids).tolist()],
            "state": str(jax.tree.map(lambda x: (x.shape, str(x.dtype)), abstract)),
        },
        sort_keys=True,
        default=str,
    )


def _compile(config, spec, model, tx, schedule, mesh, abstract, weights):
    """(train_step, predict) jitted over `mesh` for this config's EMA and label kind, reused
    from an earlier run of this process with the same computation (`_compile_key`)."""
    key = _compile_key(config, spec, weights, mesh, abstract)
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    loss_fn = make_loss_fn(spec, weights, config.loss.label_smoothing)
    steps = compile_steps(
        model,
        tx,
        loss_fn,
        schedule,
        mesh,
        abstract,
        ema_decay=config.optim.ema_decay,
        label_kind=spec.label_kind,
    )
    _COMPILED[key] = steps
    while len(_COMPILED) > _COMPILED_MAX:
        _COMPILED.popitem(last=False)
    return steps


class ClassifierJob(job_lib.Job):
    """The DenseNet family: val AUC picks the checkpoint, test is read once at the end."""

    name = "classifier"
    hash_ignore = HASH_IGNORE

    validate = staticmethod(validate)

    def prepare(self, config, mesh) -> None:
        parallel.check_global_batch(config.train.global_batch_size, mesh)
        parallel.check_global_batch(config.eval.batch_size, mesh, what="eval batch")

    def build(self, config, workdir: str, mesh) -> job_lib.Plan:
        splits, spec = load_splits(config.data)
        train_source, train_labels, training_data, dataset_suffix = training_source(
            config, splits, spec
        )
        logging.info("training on %s", train_source)
        weights = class_weights(spec, train_labels, config.loss.class_weighting)
        model = make_model(config.model, spec.num_classes)
        num_steps = int(config.train.num_steps)
        tx, schedule = optim.make_optimizer(config.optim, num_steps)
        resolution = int(config.data.resolution)
        image_shape = (resolution, resolution, 1)
        use_ema = config.optim.ema_decay > 0
        rng = jax.random.PRNGKey(config.seed)
        init_fn = functools.partial(init_state, model, tx, image_shape=image_shape, use_ema=use_ema)
        if config.model.pretrained:
            from cxrjax.models import torch_import

            # Concrete (not eval_shape's): a head that does not fit (ImageNet's) keeps its init.
            init_vars = model.init(rng, jnp.zeros((1, *image_shape)), train=False)
            variables = torch_import.load_pretrained(config.model.pretrained, init_vars)
            init_fn = functools.partial(init_fn, variables=variables)
        abstract = jax.eval_shape(init_fn, rng)
        replicated = parallel.replicated(mesh)
        train_step, predict = _compile(config, spec, model, tx, schedule, mesh, abstract, weights)
        normalization = (float(config.data.mean), float(config.data.std))
        train_iter = job_lib.train_iterator(
            config,
            train_source,
            spec,
            resolution=resolution,
            normalization=normalization,
            labels=train_labels,
        )

        eval_datasets = {}

        def eval_batches(split):
            # One dataset per split, iterated again at each evaluation: its decoded images
            # are kept when they fit in data.cache_mb.
            if split not in eval_datasets:
                eval_datasets[split] = pipeline.make_eval_dataset(
                    splits[split],
                    spec,
                    global_batch_size=config.eval.batch_size,
                    resolution=resolution,
                    normalization=normalization,
                    num_workers=config.data.num_workers,
                    cache_mb=float(config.data.get("cache_mb", 0)),
                )
            return eval_datasets[split]

        plateau = classifier_lib.ValPlateau(config, spec, weights, replicated, train_step)

        # Validation predictions per evaluated step: the final evaluation of the selected
        # checkpoint reuses them instead of predicting the same images with the same weights.
        val_predictions: dict[int, dict[str, np.ndarray]] = {}

        def eval_fn(state, step):
            out = predict_split(predict, state, eval_batches("val"), mesh)
            val_predictions[int(step)] = out
            result = cls_metrics.evaluate(
                out["labels"], out["probs"], class_names=spec.class_names, n_bootstrap=0
            )
            return {
                "val/auc": headline_auc(result),
                **plateau.observe(out["labels"], out["probs"]),
            }

        return job_lib.Plan(
            init_fn=init_fn,
            batches=train_iter,
            # CheXNet's val_plateau wraps the step, else it is train_step itself.
            train_step=plateau.train_step,
            signature={
                "dataset": f"{config.data.name}:{config.data.resolution}:{config.data.labels}"
                + dataset_suffix,
                "train_records": len(train_source),
            },
            abstract=abstract,
            eval_fn=eval_fn,
            eval_every=int(config.train.eval_every),
            best_metric="val/auc",
            on_restore=lambda state, start_step: plateau.resume(eval_fn, state, start_step),
            extra=dict(
                spec=spec, splits=splits, predict=predict, eval_batches=eval_batches,
                train_records=len(train_source), training_data=training_data,
                val_predictions=val_predictions,
            ),
        )  # fmt: skip

    def finish(self, config, plan: job_lib.Plan, ended: job_lib.Ended) -> dict[str, Any]:
        extra, state, checkpointer = plan.extra, ended.state, ended.checkpointer
        selected_step = ended.step
        if config.train.select == "best" and checkpointer.best_step() is not None:
            selected_step = checkpointer.best_step()
            if selected_step != ended.step:
                state, _ = checkpointer.restore(selected_step, ended.abstract_placed)
        training_data = extra["training_data"]
        return final_evaluation(
            config,
            extra["spec"],
            extra["predict"],
            state,
            extra["eval_batches"],
            ended.mesh,
            ended.workdir,
            val=extra["val_predictions"].get(int(selected_step)),
            extra={
                "selected_step": int(selected_step),
                "num_steps": int(config.train.num_steps),
                "nonfinite_steps": int(jax.device_get(state.nonfinite_steps)),
                "split_sizes": {role: len(src) for role, src in extra["splits"].items()},
                "train_records": int(extra["train_records"]),
                "training_data": training_data,
                # Which split each decision read: test only gives the final numbers.
                "splits_used": {
                    "training": training_splits(config.data, bool(training_data["synthetic"])),
                    "checkpoint_selection": config.data.val_split
                    if config.train.select == "best" and config.train.eval_every
                    else None,
                    "threshold": config.data.val_split,
                    "reported": config.data.test_split,
                },
                # Every session's rows, one per step (metrics.jsonl), not only this session's.
                "history": ended.history,
            },
        )


JOB = ClassifierJob()


def train_and_evaluate(
    config, workdir: str, *, stop_at: int | None = None, **workdir_options
) -> dict[str, Any]:
    """Trains, picks the checkpoint on validation, evaluates test once; writes results.json.

    Re-running on the same workdir resumes an interrupted run, and returns the saved results
    of a finished one without touching the test split again; a workdir of another config is
    refused before anything is written (`workdir.check`; `workdir_options`: overwrite,
    force_resume). See `cxrjax.train.job`.
    """
    return job_lib.train(JOB, config, workdir, stop_at=stop_at, **workdir_options)


def final_evaluation(
    config, spec, predict, state, eval_batches, mesh, workdir, *, extra, val=None
) -> dict:
    """Threshold on validation, then the one read of test; writes JSON, Markdown and ROC PNG.

    `val`: this state's validation predictions when the run already made them (periodic eval).
    """
    if val is None:
        val = predict_split(predict, state, eval_batches("val"), mesh)
    threshold = cls_metrics.select_threshold(
        val["labels"], val["probs"], config.eval.threshold, class_names=spec.class_names
    )
    common = dict(
        class_names=spec.class_names,
        n_bootstrap=config.eval.bootstrap,
        seed=config.seed,
        level=config.eval.confidence,
    )
    val_result = cls_metrics.evaluate(val["labels"], val["probs"], threshold=threshold, **common)
    test = predict_split(predict, state, eval_batches("test"), mesh)  # The only read of test.
    test_result = cls_metrics.evaluate(test["labels"], test["probs"], threshold=threshold, **common)
    figures = bool(config.eval.get("figures", True)) and parallel.is_main_process()
    figure = os.path.join(workdir, "reliability.png") if figures else None
    extra = {**extra, "calibration": calibration.evaluate(val, test, **common, figure_path=figure)}
    if chexnet.applies(spec.class_names):  # the NIH findings: the paper's AUCs beside ours
        extra["chexnet_comparison"] = chexnet.comparison(test_result)
    results = {
        "dataset": {
            "name": config.data.name,
            "resolution": config.data.resolution,
            "labels": config.data.labels,
            "class_names": list(spec.class_names),
            "label_kind": spec.label_kind,
        },
        "seed": int(config.seed),
        "threshold": threshold,
        "threshold_method": config.eval.threshold,
        "val": val_result,
        "test": test_result,
        "config": config_lib.to_dict(config),
        "software": results_lib.software_versions(),
        "device": results_lib.device_description(),
        **extra,
    }
    if parallel.is_main_process():
        fileio.save_npz(os.path.join(workdir, "test_predictions.npz"), **test)
        fileio.save_npz(os.path.join(workdir, "val_predictions.npz"), **val)
        curves = {"test": (test["labels"], test["probs"]), "val": (val["labels"], val["probs"])}
        if figures and spec.label_kind == sources.MULTICLASS and spec.num_classes == 2:
            report.save_roc_curves(curves, os.path.join(workdir, "roc.png"), title="ROC (DenseNet)")
        write_markdown(os.path.join(workdir, "results.md"), results)
    return results


def load_run_config(workdir: str):
    """The resolved config a run wrote at start (workdir/config.json) as a ConfigDict."""
    return runs.read_config(workdir, "train_classifier")


def evaluate_checkpoint(
    workdir: str, split: str, *, step: int | None = None, output_dir: str | None = None
) -> dict[str, Any]:
    """Runs a saved checkpoint on any split of its dataset; JSON + Markdown + ROC PNG.

    The decision threshold is re-chosen on the validation split for this checkpoint (never on
    the split being evaluated). `step` None = the best-by-validation checkpoint, else latest.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = load_run_config(workdir)
    validate(config)
    mesh = parallel.make_mesh()
    parallel.check_global_batch(config.eval.batch_size, mesh, what="eval batch")
    run = runs.load(workdir, step=step, mesh=mesh)
    state, step, spec = run.state, run.step, run.spec
    options = runs.dataset_options(config.data)
    val_source, _ = builders.load(config.data.name, config.data.val_split, **options)
    eval_source, _ = builders.load(config.data.name, split, **options)
    model, tx, schedule, abstract = (
        run.modules["model"],
        run.parts.tx,
        run.parts.schedule,
        run.parts.abstract,
    )
    resolution = int(config.data.resolution)
    ones = np.ones(spec.num_classes, np.float32)  # predict only: the loss weights do not matter
    _, predict = _compile(config, spec, model, tx, schedule, mesh, abstract, ones)
    normalization = (float(config.data.mean), float(config.data.std))

    def batches(source):
        return pipeline.make_eval_dataset(
            source,
            spec,
            global_batch_size=config.eval.batch_size,
            resolution=resolution,
            normalization=normalization,
        )

    val = predict_split(predict, state, batches(val_source), mesh)
    threshold = cls_metrics.select_threshold(
        val["labels"], val["probs"], config.eval.threshold, class_names=spec.class_names
    )
    out = predict_split(predict, state, batches(eval_source), mesh)
    result = cls_metrics.evaluate(
        out["labels"],
        out["probs"],
        threshold=threshold,
        class_names=spec.class_names,
        n_bootstrap=config.eval.bootstrap,
        seed=config.seed,
        level=config.eval.confidence,
    )
    results = {
        "workdir": workdir,
        "step": int(step),
        "split": split,
        "threshold": threshold,
        "threshold_method": config.eval.threshold,
        "seed": int(config.seed),
        "dataset": {"name": config.data.name, "class_names": list(spec.class_names)},
        "val": cls_metrics.evaluate(
            val["labels"],
            val["probs"],
            threshold=threshold,
            class_names=spec.class_names,
            n_bootstrap=0,
        ),
        split: result,
        "software": results_lib.software_versions(),
        "device": results_lib.device_description(),
    }
    output_dir = output_dir or os.path.join(workdir, f"eval_{split}_step{step}")
    if parallel.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        results_lib.save_results(os.path.join(output_dir, "results.json"), results)
        if spec.label_kind == sources.MULTICLASS and spec.num_classes == 2:
            report.save_roc_curves(
                {split: (out["labels"], out["probs"]), "val": (val["labels"], val["probs"])},
                os.path.join(output_dir, "roc.png"),
                title=f"ROC, step {step}",
            )
        write_markdown(
            os.path.join(output_dir, "results.md"),
            {**results, "selected_step": step, "num_steps": config.train.num_steps},
            splits=("val", split),
        )
    return results


def write_markdown(
    path: str, results: Mapping[str, Any], splits: tuple[str, ...] = ("val", "test")
) -> None:
    keys = ("auc", "pr_auc", "accuracy", "precision", "recall", "specificity", "f1")
    rows = []
    for split in splits:
        result = results[split]
        source = result if "auc" in result else result.get("macro", {})
        row = {"split": split}
        for key in keys:
            if key in source:
                row[key] = report.format_value(source[key], ci=source.get(f"{key}_ci"))
        rows.append(row)
    lines = [
        f"# Classifier results: {results['dataset']['name']}",
        "",
        f"Checkpoint step {results.get('selected_step')} of {results.get('num_steps')}; "
        f"threshold {results['threshold_method']} on validation = {results['threshold']}; "
        f"seed {results['seed']}; 95% bootstrap CIs over test images.",
        "",
        report.markdown_table(rows, ["split", *[k for k in keys if k in rows[-1]]]),
        "",
        "![ROC](roc.png)" if os.path.exists(os.path.join(os.path.dirname(path), "roc.png")) else "",
    ]
    for key, section in (("calibration", calibration), ("chexnet_comparison", chexnet)):
        lines += ["", section.markdown(results[key])] if key in results else []
    fileio.write_text(path, "\n".join(lines) + "\n")
