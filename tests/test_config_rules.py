"""Every field of every preset: a wrong-typed, out-of-range or non-finite value is refused (#19).

Through the real launchers: for every config file (configs/*.py), every preset and every field,
each bad value its rule names is given as `--config=configs/<file>.py:<preset>
--config.<field>=<value>` to that file's launcher (launch/train_*.py, launch/run_experiment.py)
and handed to the launcher's own `main`, in one process per launcher
(tests/launcher_harness.py): it must exit 2 with exactly one `error: ...` line on stderr naming
the field, no traceback, and start nothing (the workdir sits below a file, so a value that
passed validation would fail on `--workdir`, not run, and no directory can appear). A few true
subprocesses (`python -m launch.<x>`) prove the same for a whole process.

Set CXRJAX_ERROR_TABLE=path to write the table of every value tried and its error
(docs/config_errors.md is generated this way).
"""

import importlib.util
import os

import pytest

from cxrjax import config as config_lib
from cxrjax.experiment import design
from cxrjax.train import anomaly_run, classifier_run, diffusion_run, gan_run
from tests import launcher_harness as harness

REPO = harness.REPO
# config file -> (launcher, driver (None: the experiment), presets)
FAMILIES = {
    "classifier": (
        "train_classifier",
        classifier_run,
        ("tiny", "pneumonia_mnist", "kermany_binary", "kermany_3class", "nih14", "image_folder"),
    ),
    "pggan": ("train_pggan", gan_run, ("tiny", "pneumonia_mnist", "pneumonia_mnist_scarce")),
    "ddpm": ("train_ddpm", diffusion_run, ("tiny", "pneumonia_mnist")),
    "anomaly": ("train_anomaly", anomaly_run, ("tiny", "pneumonia_mnist", "pneumonia_mnist_ddpm")),
    "experiment": (
        "run_experiment",
        None,
        (
            "smoke",
            "launcher_smoke",
            "demo",
            "kermany_binary_128",
            "kermany_binary_256",
            "kermany_3class_128",
            "kermany_3class_256",
            "nih14_224",
        ),
    ),
}


def _config_module(family):
    spec = importlib.util.spec_from_file_location(
        f"cfg_{family}", os.path.join(REPO, "configs", f"{family}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rule(family, field, value):
    driver = FAMILIES[family][1]
    if driver is None:
        return design.field_rule(field, value)
    return config_lib.rule_for(field, value, (*driver.RULES, *config_lib.RULES))


def _declared(family, field):
    driver = FAMILIES[family][1]
    if driver is None:
        section, _, rest = field.partition(".")
        if section in design.SECTIONS and rest:
            kind = design.SECTIONS[section]
            return config_lib.declared(rest, (*design.driver(kind).RULES, *config_lib.RULES))
        from cxrjax.experiment import launchers

        return config_lib.declared(field, (*design.RULES, *launchers.RULES, *config_lib.RULES))
    return config_lib.declared(field, (*driver.RULES, *config_lib.RULES))


def test_every_preset_passes_and_every_field_has_a_rule(tmp_path):
    for family, (_, driver, presets) in FAMILIES.items():
        module = _config_module(family)
        for preset in presets:
            config = module.get_config(preset)
            if driver is None:
                design.validate(config, str(tmp_path))  # the defaults are valid
            else:
                config_lib.check_fields(config, driver.RULES)
            missing = [f for f, _ in config_lib.leaves(config) if not _declared(family, f)]
            assert not missing, f"{family}:{preset} fields without a rule: {missing}"


def _cases(family, presets):
    """(preset, field, bad value) for every field of every preset; a field and value already
    tried in an earlier preset of the same file are not tried again (same rule, same path)."""
    module = _config_module(family)
    seen, cases, free = set(), [], []
    for preset in presets:
        for field, value in config_lib.leaves(module.get_config(preset)):
            bad = _rule(family, field, value).bad_values()
            if not bad:
                free.append(f"{family}:{field}")
            for text in bad:
                if (field, text) not in seen:
                    seen.add((field, text))
                    cases.append((preset, field, text))
    return cases, free


def test_every_bad_value_of_every_field_is_one_line_exit_2_through_the_launcher(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a workdir cannot be made below a file")
    workdir = str(blocker / "workdir")
    planned, processes, free = {}, {}, []
    for family, (launcher, _, presets) in FAMILIES.items():
        cases, family_free = _cases(family, presets)
        free += family_free
        planned[family] = cases
        argvs = [
            [f"--config=configs/{family}.py:{preset}", f"--workdir={workdir}",
             f"--config.{field}={text}"]
            for preset, field, text in cases
        ]  # fmt: skip
        processes[family] = harness.start_refusals(launcher, argvs)
    rows = []
    for family, process in processes.items():
        results = harness.finish_refusals(process)
        for (preset, field, text), result in zip(planned[family], results, strict=True):
            err = result["stderr"]
            lines = err.strip().splitlines()
            where = (family, preset, field, text, err[-2000:])
            assert result["code"] == 2, where
            assert len(lines) == 1 and lines[0].startswith("error: "), where
            assert "Traceback" not in err and field in lines[0], where
            assert "Unknown command line flag" not in lines[0], where
            assert "not a writable directory" not in lines[0], where  # validation passed
            assert not result["workdir_exists"], where
            rows.append((family, preset, field, text, lines[0][len("error: ") :]))
    assert {row[0] for row in rows} == set(FAMILIES) and len(rows) > 600
    # Every int / float / bool field was tried with a wrong type, every float with nan and inf.
    tried = {(r[0], r[2], r[3]) for r in rows}
    for family, (_, _, presets) in FAMILIES.items():
        for preset in presets:
            for field, value in config_lib.leaves(_config_module(family).get_config(preset)):
                if isinstance(value, bool):
                    assert (family, field, "maybe") in tried
                elif isinstance(value, float):
                    assert {(family, field, "nan"), (family, field, "inf")} <= tried, field
                elif isinstance(value, int):
                    assert (family, field, "abc") in tried, field
    path = os.environ.get("CXRJAX_ERROR_TABLE")
    if path:
        _write_table(path, rows, free)


def test_real_launcher_processes_exit_2_with_one_line(tmp_path):
    """The same for whole processes (`python -m launch.<x>`: absl's app.run and all)."""
    workdir = tmp_path / "workdir"
    commands = {
        "optim.lr": ("train_classifier", "--config=configs/classifier.py:tiny",
                     "--config.optim.lr=nan"),
        "seeds": ("run_experiment", "--config=configs/experiment.py:demo", "--config.seeds=0"),
        "classifier.train.num_steps": ("run_experiment", "--config=configs/experiment.py:smoke",
                                       "--config.classifier.train.num_steps=abc"),
    }  # fmt: skip
    started = {
        field: harness.start(launcher, *args, f"--workdir={workdir}")
        for field, (launcher, *args) in commands.items()
    }
    for field, process in started.items():
        error = harness.one_error(harness.finish(process), 2)
        assert field in error, error
    assert not workdir.exists()


def _write_table(path, rows, free):
    lines = [
        "# Bad config values and their one-line errors",
        "",
        "Generated by `CXRJAX_ERROR_TABLE=docs/config_errors.md python -m pytest "
        "tests/test_config_rules.py`: every field of every preset of every config file, each "
        "bad value given as `--config=configs/<file>.py:<preset> --config.<field>=<value>` to "
        "that file's launcher (`launch/train_*.py`, `launch/run_experiment.py`) and run "
        "through the launcher's own flag parsing and `main`; every one exits 2 with this one "
        "line on stderr, no traceback, and starts nothing. A field and value already tried in "
        "an earlier preset of the same file are listed once.",
        "",
        "| config file | preset | field | value | error |",
        "| --- | --- | --- | --- | --- |",
    ]
    for family, preset, field, text, error in rows:
        cell = error.replace("|", "\\|")
        lines.append(
            f"| configs/{family}.py | {preset} | `{field}` | `{text or '(empty)'}` | {cell} |"
        )
    lines += [
        "",
        "Free-text fields (any string passes validation; paths, split and class names are "
        "checked when the data is opened, with the same one-line errors): "
        + ", ".join(f"`{f}`" for f in sorted(set(free)))
        + ".",
        "",
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


@pytest.mark.parametrize(
    ("value", "rule", "ok"),
    [
        (1e-3, config_lib.number(gt=0), True),
        (float("nan"), config_lib.number(), False),
        (float("-inf"), config_lib.number(), False),
        (0, config_lib.number(gt=0), False),
        (True, config_lib.integer(ge=0), False),
        (3, config_lib.integer(ge=1, le=2), False),
        ((2, 2), config_lib.Rule(config_lib.INTS, ge=1), True),
        ((2, 0), config_lib.Rule(config_lib.INTS, ge=1), False),
        ("adam", config_lib.choice("adam", "sgd"), True),
        ("x", config_lib.choice("adam", "sgd"), False),
        (("a", "b"), config_lib.subset("a", "b"), True),
        (("a", "a"), config_lib.subset("a", "b"), False),
        (("a", "c"), config_lib.subset("a", "b"), False),
        ((), config_lib.subset("a", "b"), False),
    ],
)
def test_rules(value, rule, ok):
    assert (rule.problem(value) is None) == ok


def test_message_names_field_value_and_what_is_allowed():
    config = _config_module("classifier").get_config("tiny")
    config.unlock()
    config.optim.lr = float("inf")
    with pytest.raises(config_lib.ConfigError) as caught:
        config_lib.check_fields(config, classifier_run.RULES)
    assert str(caught.value) == (
        "config.optim.lr: must be a finite number > 0 (not NaN or infinite), got inf"
    )


def test_experiment_embedding_choices_are_the_quality_modules():
    from cxrjax import quality

    assert design.EMBEDDINGS == quality.EMBEDDINGS
