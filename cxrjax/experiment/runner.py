"""Runs (or resumes) a whole experiment: four stages of sub-runs, then results and report.

  1. data_and_headroom: the real splits and the scarce subset; real_scarce and real_full arms
     (every seed) and the headroom between them, before any generator trains.
  2. generators_and_synthesis: the judge; PGGAN / DDPM (trained, or shipped exported
     generators trained on this exact config); synthetic sets (arm sets, judge-filtered sets,
     CAS sets); quality, class fidelity, the gate; CAS classifiers.
  3. classifier_arms: every other arm over every seed.
  4. evaluation: seed-level comparisons, anomaly detection, results.json and report.md.

Every sub-run is its job family's own driver in its own sub-workdir, so a re-run skips finished
sub-runs and resumes interrupted ones; every sub-run's recorded config is checked against the
requested one before any work (`cxrjax.train.workdir`), so an edited config is refused with the
fields named instead of mixing sub-runs of two configs. SIGTERM / SIGINT stop at the next safe
point and raise `Preempted`.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from cxrjax import config as config_lib
from cxrjax import fileio, parallel, timing
from cxrjax.experiment import checks, design, evaluation, figures, launchers, stages
from cxrjax.experiment import report as report_lib
from cxrjax.experiment import utility as utility_lib
from cxrjax.train import loop
from cxrjax.train import results as results_lib
from cxrjax.train import workdir as workdir_lib

# Experiment fields that never change a reported number (the sub-runs' own harmless fields
# are checked by their drivers).
HARMLESS = (
    *workdir_lib.HARMLESS,
    "quality.batch_size",
    *(f"{family}.train.log_every" for family in ("classifier", "pggan", "ddpm", "judge")),
    *(field for field, _ in launchers.RULES),  # where sub-runs run, never what they compute
)


# Sub-run fields that hold paths inside the experiment's workdir: a copied or moved experiment
# changes them without changing what any sub-run computes.
SUBRUN_HARMLESS = (
    *workdir_lib.HARMLESS,
    "data.synthetic.manual_dir",
    "data.synthetic.data_dir",
    "generator_workdir",
    "eval.features",
)


class Preempted(Exception):
    """A signal stopped the experiment at a safe point; re-running the command resumes."""

    def __init__(self, where: str, signal_name: str | None = None):
        self.where = where
        self.signal_name = signal_name or "signal"
        super().__init__(
            f"preempted ({self.signal_name}) {where}; finished sub-runs and the last "
            "checkpoint are saved. Re-run the same command to resume."
        )


class _StopFlag(loop.PreemptionGuard):
    """SIGTERM/SIGINT -> a flag polled between sub-runs (the training loop's guard, plus...).

    Training loops install their own handlers while they run (they save and return
    "preempted"), and a signal landing in a loop's last moments (its final save) is taken by
    the loop's handler without stopping anything. So the flag also watches the interpreter's
    wakeup fd, which receives every handled signal's number whichever handler is installed.
    """

    def __init__(self):
        super().__init__()
        self._previous_fd: int | None = None
        self._pipe: tuple[int, int] | None = None

    def __enter__(self) -> _StopFlag:
        super().__enter__()
        if threading.current_thread() is not threading.main_thread():
            return self
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._previous_fd = signal.set_wakeup_fd(write_fd)
        return self

    def __exit__(self, *exc) -> None:
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_fd if self._previous_fd is not None else -1)
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
        super().__exit__(*exc)

    def _drain(self) -> None:
        if self._pipe is None:
            return
        try:
            data = os.read(self._pipe[0], 4096)
        except BlockingIOError:
            return
        for number in data:
            if number in self._signals:
                self.signal_name = self.signal_name or signal.Signals(number).name
                self._event.set()

    def check(self, where: str) -> None:
        self._drain()
        if self._event.is_set():
            raise Preempted(where, self.signal_name)


# ----------------------------------------------------------------------------- helpers
def _finished(result: Mapping[str, Any], name: str, stop: _StopFlag) -> Mapping[str, Any]:
    if result.get("finished") is False:
        stop._drain()
        raise Preempted(f"during {name} (step {result.get('step')})", stop.signal_name)
    stop.check(f"after {name}")
    return result


def check_workdirs(config, workdir: str, runs) -> None:
    """The experiment's and every started sub-run's recorded config against this one, before
    any work: an edited config is refused naming the fields, never run half old, half new."""
    workdir_lib.check(config, workdir, harmless=HARMLESS)
    for name, (kind, sub_workdir, sub) in runs.items():
        if not os.path.exists(os.path.join(sub_workdir, workdir_lib.CONFIG_FILE)):
            continue
        harmless = SUBRUN_HARMLESS
        if kind in design.GENERATORS and os.path.exists(os.path.join(sub_workdir, "generator.npz")):
            harmless = (*harmless, *stages.SHIPPED_HARMLESS)
        try:
            workdir_lib.check(sub, sub_workdir, harmless=harmless)
        except config_lib.ConfigError as error:
            raise workdir_lib.WorkdirConfigError(
                f"{name}: {error} (the experiment in {workdir} was started with another "
                "config: use a new --workdir)"
            ) from None


def accumulate_timings(workdir: str, timings: Mapping[str, float]) -> dict[str, float]:
    """Stage wall times summed over every invocation that worked on this experiment (an
    interrupted run's time is kept in timings.json and added to the one that finishes)."""
    path = os.path.join(workdir, "timings.json")
    before = stages.read_json(path) or {}
    total = {k: round(before.get(k, 0.0) + v, 2) for k, v in timings.items()}
    total["invocations"] = int(before.get("invocations", 0)) + 1
    if parallel.is_main_process():
        fileio.write_json(path, total)
    return total


def param_count(config, info) -> dict[str, Any]:
    from cxrjax.train import classifier

    model = classifier.make_model(config.classifier.model, len(info["class_names"]))
    r = int(config.data.resolution)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, r, r, 1), np.float32), train=False)
    )
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes.get("params", shapes)))
    return {"name": str(config.classifier.model.name), "parameters": count}


def generator_budget(kind: str, sub, result: Mapping[str, Any] | None, source: str) -> str:
    if kind == "pggan":
        phases = f"{sub.schedule.fade_images} + {sub.schedule.stable_images} images per phase"
        final = int(sub.schedule.get("final_stable_images", 0))
        if final:
            phases += f" ({final} in the last)"
        batch = sub.train.global_batch_size
        conditioning = "projection D" if sub.loss.get("conditioning") else "AC-GAN D"
        if not sub.model.get("conditional", True):
            conditioning = "unconditional"
        what = (
            f"{sub.model.name} to {sub.data.resolution} px, {conditioning}, {phases}, batch {batch}"
        )
    else:
        what = (
            f"{sub.model.name} at {sub.data.resolution} px, {sub.train.num_steps} steps of "
            f"batch {sub.train.global_batch_size}, lr {sub.optim.lr:g}"
        )
    if sub.data.get("balanced"):
        what += ", class-balanced batches"
    wall = (result or {}).get("wall_time_s")
    took = f": {wall / 60:.1f} min" if isinstance(wall, int | float) else ""
    return f"{what} ({source}{took})"


# ----------------------------------------------------------------------------- the run
def run(config, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the whole experiment in `workdir`; returns the results dict.

    A finished workdir of the same config returns its saved results.json; one of another
    config is refused (WorkdirConfigError). Raises `Preempted` when SIGTERM / SIGINT stopped it
    (everything finished so far is kept), ConfigError for a bad config (before any work).
    """
    start = time.perf_counter()
    workdir = os.path.abspath(os.path.expanduser(workdir))
    design.validate(config, workdir)
    runs = design.plan(config, workdir)
    check_workdirs(config, workdir, runs)
    saved = stages.read_json(os.path.join(workdir, "results.json"))
    if saved is not None:
        logging.info("%s/results.json exists: the experiment is finished", workdir)
        return saved
    if parallel.is_main_process():
        os.makedirs(workdir, exist_ok=True)
        config_lib.save_json(config, os.path.join(workdir, "config.json"))
    launcher = launchers.make(config.launcher, workdir, SUBRUN_HARMLESS)
    timings: dict[str, float] = {}
    timer = timing.Timer()  # this invocation's profile (results.json "profile")
    sub_profiles: dict[str, dict[str, float]] = {}
    sub_results: dict[str, Mapping[str, Any]] = {}
    generator_source: dict[str, str] = {}
    t0 = time.perf_counter()
    try:
        with _StopFlag() as stop, timer.compiles():

            def shipped_for(name: str):
                kind, _, sub = runs[name]
                if kind in design.GENERATORS and config.generators == "shipped" and name == kind:
                    shipped, reasons = stages.shipped_generator(kind, sub)
                    if shipped is None:
                        stages.log(design.stage_of(name), "no shipped %s for this config (%s): "
                                   "training it", kind, reasons[0])  # fmt: skip
                    return shipped
                return None

            def run_sub(name: str) -> Mapping[str, Any]:
                kind, sub_workdir, sub = runs[name]
                done = os.path.exists(os.path.join(sub_workdir, "results.json"))
                stages.log(design.stage_of(name), "%s %s (%s) -> %s",
                           "skip (finished)" if done else "run", name, kind,
                           sub_workdir)  # fmt: skip
                shipped = shipped_for(name) is not None
                with timer.section("sub-runs"):
                    if shipped:
                        result = stages.install_shipped(kind, sub, sub_workdir)
                        generator_source[name] = result["source"]
                    else:
                        result = design.driver(kind).train_and_evaluate(
                            sub, sub_workdir, harmless=SUBRUN_HARMLESS
                        )
                        generator_source.setdefault(name, "trained in this run")
                if not done and not shipped:  # an installed export's profile is its training's
                    add_profile(sub_profiles, design.STAGES[design.stage_of(name) - 1], result)
                sub_results[name] = _finished(result, name, stop)
                return result

            def run_subs(names: list[str]) -> None:
                """Sub-runs that need nothing from each other: one after another inline, or
                all at once as jobs (shipped generators are installed here either way)."""
                if launcher is None:
                    for number, name in enumerate(names, start=1):
                        if design.stage_of(name) == 3:
                            stages.log(3, "classifier %d of %d", number, len(names))
                        run_sub(name)
                    return
                local = [name for name in names if shipped_for(name) is not None]
                for name in local:
                    run_sub(name)
                remote = [name for name in names if name not in local]
                for name, result in launcher.run(remote, runs, stop).items():
                    generator_source.setdefault(name, "trained in this run")
                    sub_results[name] = result

            # Stage 1: data, the headroom arms.
            t0 = time.perf_counter()
            with timer.scope(design.STAGES[0]):
                with timer.section("data"):
                    data = stages.prepare_data(config, workdir)
                info = data["info"]
                run_subs([name for name in runs if design.stage_of(name) == 1])
            timings[design.STAGES[0]] = results_lib.elapsed(t0)

            # Stage 2: the judge, generators, synthesis, quality, CAS.
            t0 = time.perf_counter()
            judge = real = None
            with timer.scope(design.STAGES[1]):
                if "judge" in runs:
                    run_subs(["judge"])
                    with timer.section("judging real images"):
                        judge = stages.Judge(runs["judge"][1], info, config.scarcity.class_name)
                        real = utility_lib.real_probabilities(config, data, judge)
                kinds = design.needed_generators(config)
                run_subs(list(kinds))
                with timer.section("synthesis"):
                    synthetic = (
                        stages.synthesize_all(config, workdir, data, judge, real, stop)
                        if kinds
                        else {"count": 0, "sets": {}, "thresholds": None}
                    )
                with timer.section("quality"):
                    quality = (
                        utility_lib.evaluate(config, workdir, data, synthetic, judge, real, stop)
                        if judge is not None and config.quality.enabled
                        else {}
                    )
                run_subs([name for name in runs if name.startswith("cas/")])
            timings[design.STAGES[1]] = results_lib.elapsed(t0)

            # Stage 3: every other arm.
            t0 = time.perf_counter()
            with timer.scope(design.STAGES[2]):
                run_subs([name for name in runs if design.stage_of(name) == 3])
            timings[design.STAGES[2]] = results_lib.elapsed(t0)

            # Stage 4: comparisons, anomaly detection.
            t0 = time.perf_counter()
            with timer.scope(design.STAGES[3]):
                with timer.section("statistics"):
                    arms, extras = evaluation.arm_results(config, workdir, info, runs)
                    comparisons = evaluation.comparisons(config, arms, extras)
                    headroom = evaluation.headroom(config, arms, extras)
                # The anomaly generators first: the anomaly methods score with them.
                anomaly_runs = [name for name in runs if name.startswith("anomaly/")]
                run_subs([name for name in anomaly_runs if runs[name][0] in design.GENERATORS])
                run_subs([name for name in anomaly_runs if runs[name][0] not in design.GENERATORS])
                with timer.section("anomaly scoring"):
                    anomaly = (
                        evaluation.anomaly_results(config, workdir, runs)
                        if config.anomaly.enabled
                        else {}
                    )
            timings[design.STAGES[3]] = results_lib.elapsed(t0)
    except BaseException:
        # Preempted, or any failure: the time this invocation spent is kept (timings.json) and
        # added to the invocation that finishes the run.
        current = next((s for s in design.STAGES if s not in timings), None)
        if current is not None:
            timings[current] = results_lib.elapsed(t0)
        timings["total"] = results_lib.elapsed(start)
        accumulate_timings(workdir, timings)
        raise
    timings["total"] = results_lib.elapsed(start)
    timings = accumulate_timings(workdir, timings)
    results = assemble(
        config, workdir, runs, sub_results, info, arms, extras, comparisons, headroom, synthetic,
        quality, anomaly, timings, generator_source,
    )  # fmt: skip
    results["profile"] = profile(timer, timings, sub_profiles)
    if launcher is not None:
        results["jobs"] = launcher.summary()
    problems = checks.check_results(results)
    if problems:
        raise AssertionError("experiment results fail their invariants: " + "; ".join(problems))
    if parallel.is_main_process():
        figs = figures.make_figures(
            config, workdir, runs, data, synthetic, quality, anomaly, extras
        )
        results["figures"] = figs
        text = report_lib.markdown(results, figs, figures.caption)
        fileio.write_text(os.path.join(workdir, "report.md"), text)
        results_lib.save_results(os.path.join(workdir, "results.json"), results)
    logging.info(
        "[experiment] finished in %s: %s/report.md", report_lib.duration(timings["total"]), workdir
    )
    for line in results["warnings"]:
        logging.warning("[experiment] %s", line)
    return results


def add_profile(totals: dict[str, dict[str, float]], stage: str, result) -> None:
    """Adds a finished sub-run's own profile (results.json "profile") to its stage's sums."""
    own = (result or {}).get("profile")
    if not own:
        return
    sums = totals.setdefault(stage, {"count": 0})
    sums["count"] += 1
    for name, seconds in own.items():
        sums[name] = round(sums.get(name, 0.0) + float(seconds), 2)


def profile(timer: timing.Timer, timings, sub_profiles) -> dict[str, Any]:
    """This invocation's profile: per stage, the seconds of each of its sections (sub-runs,
    synthesis, quality, ...; JAX's tracing and compiles are in "trace" and "compile") and the
    sums of the sub-runs' own profiles (setup, trace, compile, checkpoint, data, eval, finish,
    steps)."""
    return {
        "stages": {
            stage: timer.summary(timings[stage], prefix=f"{stage}/")
            for stage in design.STAGES
            if stage in timings
        },
        "sub_runs": sub_profiles,  # trained here; installed shipped generators are not in it
        "shipped_excluded": True,
        "compile_cache": dict(timer.events),
        "scope": "the invocation that finished the run (not a resumed run's earlier ones)",
    }


def assemble(
    config, workdir, runs, sub_results, info, arms, extras, comparisons, headroom, synthetic,
    quality, anomaly, timings, generator_source,
) -> dict[str, Any]:  # fmt: skip
    """results.json: every figure the report prints, with the data, splits and seeds behind it."""
    split_use = {
        "test_split": config.data.test_split,
        "val_split": config.data.val_split,
        "training": {},
        "threshold": {},
        "checkpoint_selection": {},
        "quality_real": config.quality.real_split,
    }
    for name, (kind, sub_workdir, sub) in runs.items():
        result = sub_results.get(name) or stages.read_json(
            os.path.join(sub_workdir, "results.json")
        )
        if kind == "classifier":
            used = result["splits_used"]
            split_use["training"][name] = used["training"]
            split_use["threshold"][name] = used["threshold"]
            split_use["checkpoint_selection"][name] = used["checkpoint_selection"]
        elif kind == "anomaly":
            split_use["training"][name] = design.training_splits(kind, sub)
            split_use["threshold"][name] = result.get("threshold_split")
        else:
            split_use["training"][name] = design.training_splits(kind, sub)
    generators = {}
    for name, (kind, sub_workdir, sub) in runs.items():
        if kind not in design.GENERATORS:
            continue
        result = sub_results.get(name) or {}
        source = generator_source.get(name, "trained in this run")
        generators[name] = {
            "workdir": os.path.relpath(sub_workdir, workdir),
            "source": "trained" if source == "trained in this run" else "shipped",
            "source_detail": source,
            "budget": generator_budget(kind, sub, result, source),
            "steps": result.get("step", result.get("final_step")),
            "wall_time_s": result.get("wall_time_s"),
        }
    cas_results = {
        name.removeprefix("cas/"): sub_results.get(name)
        or stages.read_json(os.path.join(runs[name][1], "results.json"))
        for name in runs
        if name.startswith("cas/")
    }
    cas = utility_lib.cas(cas_results)
    gains = {}
    for c in comparisons:
        if design.arm_generator(c["arm"]) and c.get("primary"):
            gains[c["arm"]] = c["paired_t"]["mean"]
    results: dict[str, Any] = {
        "finished": True,
        "preset": str(config.get("preset", "")),
        "config": config_lib.to_dict(config),
        "dataset": info,
        "classifier_model": param_count(config, info),
        "headroom": headroom,
        "generators": generators,
        "synthetic": {
            "count": synthetic.get("count", 0),
            "thresholds": synthetic.get("thresholds"),
            "sets": {
                key: {
                    "folder": os.path.relpath(entry["folder"], workdir),
                    "generator": entry["generator"],
                    "counts": (entry.get("provenance") or {}).get("counts"),
                    "filter": (entry.get("provenance") or {}).get("filter"),
                }
                for key, entry in synthetic.get("sets", {}).items()
            },
        },
        "quality": quality,
        "cas": cas,
        "metric_vs_utility": utility_lib.metric_vs_utility(quality, cas, gains),
        "arms": arms,
        "evaluation": {
            "test_images": int(len(extras["y"]["test"])),
            "target": evaluation.target_description(info, config.scarcity.class_name),
            "headline": (
                f"binary task, precision / recall / F1 of the positive class "
                f"{info['class_names'][1]!r}"
                if len(info["class_names"]) == 2 and info["label_kind"] == "multiclass"
                else "macro averages over classes"
            ),
            "primary_test": "paired t on per-seed test ROC-AUC differences, Holm-corrected",
            "comparisons": comparisons,
        },
        "anomaly": anomaly,
        "split_use": split_use,
        "wall_time_s": timings,
        "sub_run_wall_time_s": {
            name: (result or {}).get("wall_time_s") for name, result in sub_results.items()
        },
        "software": results_lib.software_versions(),
        "device": results_lib.device_description(),
    }
    results = json.loads(fileio.dumps(results))
    results["warnings"] = report_lib.warnings_list(results)
    return results
