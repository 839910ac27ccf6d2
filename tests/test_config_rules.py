"""Every field of every preset: a wrong-typed, out-of-range or non-finite value is refused (#19).

In-process over all fields (no JAX process per field): each bad value goes through the real
launchers' path — `common.parse_flags` on the `--config.<field>=<value>` override (the flags a
launcher defines), then `common.run_job` with the trainer's validation (`validate_training`:
`config.check_fields` + the driver's own checks) — and must end in exit 2 with one `error:`
line naming the field, before any directory exists. tests/faults/test_fault_workdir_config.py
proves the same for real subprocesses (exit 2, one line, no traceback, no directory).

Set CXRJAX_ERROR_TABLE=path to write the table of every value tried and its error
(docs/config_errors.md is generated this way).
"""

import importlib.util
import os

import pytest
from absl import flags
from ml_collections import config_flags

from cxrjax import config as config_lib
from cxrjax.train import anomaly_run, classifier_run, diffusion_run, gan_run
from launch import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {
    "classifier": (
        classifier_run,
        ("tiny", "pneumonia_mnist", "kermany_binary", "kermany_3class", "nih14", "image_folder"),
    ),
    "pggan": (gan_run, ("tiny", "pneumonia_mnist", "pneumonia_mnist_scarce")),
    "ddpm": (diffusion_run, ("tiny", "pneumonia_mnist")),
    "anomaly": (anomaly_run, ("tiny", "pneumonia_mnist", "pneumonia_mnist_ddpm")),
}


def _config_module(family):
    spec = importlib.util.spec_from_file_location(
        f"cfg_{family}", os.path.join(REPO, "configs", f"{family}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(family, preset, overrides, workdir, capsys):
    """The launcher's parse + validate path in-process: (exit code or 0, stderr)."""
    driver = FAMILIES[family][0]
    argv = ["prog", f"--config=configs/{family}.py:{preset}", f"--workdir={workdir}", *overrides]
    flag_values = flags.FlagValues()
    # As in the launchers (lock_config=True); sys_argv names the overrides to define.
    config_flags.DEFINE_config_file(
        "config", None, "config", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flags.DEFINE_string("workdir", None, "workdir", flag_values=flag_values)
    capsys.readouterr()
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        common.parse_flags(argv, flag_values)
        config = flag_values["config"].value
        common.run_job(
            lambda: pytest.fail("validation passed: the job would run"),
            lambda results: results,
            validate=lambda: common.validate_training(driver, config, workdir, {}),
        )
    except SystemExit as stop:
        return stop.code, capsys.readouterr().err
    finally:
        os.chdir(cwd)
    return 0, capsys.readouterr().err


def test_every_preset_passes_and_every_field_has_a_rule():
    for family, (driver, presets) in FAMILIES.items():
        module = _config_module(family)
        table = (*driver.RULES, *config_lib.RULES)
        for preset in presets:
            config = module.get_config(preset)
            config_lib.check_fields(config, driver.RULES)  # the defaults are valid
            missing = [f for f, _ in config_lib.leaves(config) if not config_lib.declared(f, table)]
            assert not missing, f"{family}:{preset} fields without a rule: {missing}"


def test_every_bad_value_of_every_field_is_one_line_exit_2(tmp_path, capsys):
    rows, free = [], []
    workdir = tmp_path / "never_created"
    for family, (driver, presets) in FAMILIES.items():
        module = _config_module(family)
        table = (*driver.RULES, *config_lib.RULES)
        seen = set()
        for preset in presets:
            for field, value in config_lib.leaves(module.get_config(preset)):
                rule = config_lib.rule_for(field, value, table)
                bad = rule.bad_values()
                if not bad:
                    free.append(f"{family}:{field}")
                for text in bad:
                    if (field, text) in seen:
                        continue  # the same field and value in another preset: same path
                    seen.add((field, text))
                    code, err = launch(
                        family, preset, [f"--config.{field}={text}"], str(workdir), capsys
                    )
                    lines = err.strip().splitlines()
                    assert code == 2, (family, preset, field, text, err)
                    assert len(lines) == 1 and lines[0].startswith("error: "), (field, text, err)
                    assert "Traceback" not in err
                    assert field in lines[0], (field, text, lines[0])
                    assert "Unknown command line flag" not in lines[0]
                    rows.append((family, preset, field, text, lines[0][len("error: ") :]))
    assert not workdir.exists()
    families = {row[0] for row in rows}
    assert families == set(FAMILIES) and len(rows) > 300
    # Every int / float / bool field was tried with a wrong type, every float with nan and inf.
    tried = {(r[0], r[2], r[3]) for r in rows}
    for family, (_, presets) in FAMILIES.items():
        for field, value in config_lib.leaves(_config_module(family).get_config(presets[0])):
            if isinstance(value, bool):
                assert (family, field, "maybe") in tried
            elif isinstance(value, float):
                assert {(family, field, "nan"), (family, field, "inf")} <= tried, field
            elif isinstance(value, int):
                assert (family, field, "abc") in tried, field
    path = os.environ.get("CXRJAX_ERROR_TABLE")
    if path:
        _write_table(path, rows, free)


def _write_table(path, rows, free):
    lines = [
        "# Bad config values and their one-line errors",
        "",
        "Generated by `CXRJAX_ERROR_TABLE=docs/config_errors.md python -m pytest "
        "tests/test_config_rules.py`: every field of every preset, each value given as "
        "`--config.<field>=<value>` to the launcher; every one exits 2 with this one line on "
        "stderr and creates no directory.",
        "",
        "| family | preset | field | value | error |",
        "| --- | --- | --- | --- | --- |",
    ]
    for family, preset, field, text, error in rows:
        cell = error.replace("|", "\\|")
        lines.append(f"| {family} | {preset} | `{field}` | `{text or '(empty)'}` | {cell} |")
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
