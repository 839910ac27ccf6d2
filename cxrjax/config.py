"""Config helpers shared by configs/ and the trainers: validation, hashing, persistence.

Configs are ml_collections ConfigDicts built by `configs/*.py:get_config(arg)`. Trainers call
`check_fields(config)` first: one declarative table (`RULES`, glob patterns on dotted field
names -> `Rule`: type, range, choices, finiteness, paths) checks every field of every preset,
so a wrong type, an out-of-range, NaN or infinite number fails in a second with a ConfigError
naming the field, the value and what is allowed. Relations between fields and choices owned by
other modules (dataset names, model names) stay in each driver's `validate`, via `check(...)`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{field}: {message}")


def check_choice(config: Any, field: str, choices: tuple[str, ...]) -> None:
    value = get(config, field)
    check(value in choices, field, f"must be one of {choices}, got {value!r}")


def check_positive(config: Any, field: str, *, allow_zero: bool = False) -> None:
    value = get(config, field)
    ok = isinstance(value, int | float) and (value >= 0 if allow_zero else value > 0)
    check(ok, field, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


# ------------------------------------------------------------------------ declarative rules
NUMBER, INT, BOOL, TEXT, CHOICE, PATH, INTS, SUBSET = (
    "number",
    "int",
    "bool",
    "text",
    "choice",
    "path",
    "ints",
    "subset",
)


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one field accepts. `kind`: number (int or float, always finite), int, bool, text,
    choice (one of `choices`), subset (a non-empty sequence of distinct `choices`), path (an
    existing `path_kind` "dir"/"file" when non-empty), ints (a non-empty sequence of ints, each
    in range; `allow_empty` also takes ()). Bounds:
    ge/gt/le/lt (None = open)."""

    kind: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] = ()
    nonempty: bool = False
    path_kind: str = "dir"
    allow_empty: bool = False  # ints only

    def allowed(self) -> str:
        """What is allowed, in words (for messages and docs)."""
        if self.kind == CHOICE:
            return f"one of {list(self.choices)}"
        if self.kind == SUBSET:
            return f"a non-empty list of distinct names from {list(self.choices)}"
        if self.kind == BOOL:
            return "True or False"
        if self.kind == PATH:
            return f"an existing {self.path_kind}" + ("" if self.nonempty else ' or ""')
        if self.kind == TEXT:
            return "a non-empty string" if self.nonempty else "a string"
        bounds = [
            f"{op} {_fmt(v)}"
            for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if v is not None
        ]
        ints = "a list of integers" if self.allow_empty else "a non-empty list of integers"
        noun = {NUMBER: "a finite number", INT: "an integer", INTS: ints}
        text = noun[self.kind]
        return f"{text} {' and '.join(bounds)}" if bounds else text

    def problem(self, value: Any) -> str | None:
        """None when `value` is allowed, else why not (without the field name)."""
        if self.kind == INTS:
            ok = isinstance(value, list | tuple) and (len(value) > 0 or self.allow_empty)
            ok = ok and all(self._in_range(v) for v in value if _is_int(v))
            ok = ok and all(_is_int(v) for v in value)
            return None if ok else f"must be {self.allowed()}"
        if self.kind == BOOL:
            return None if isinstance(value, bool) else f"must be {self.allowed()}"
        if self.kind == CHOICE:
            return None if value in self.choices else f"must be {self.allowed()}"
        if self.kind == SUBSET:
            if not isinstance(value, list | tuple):
                return f"must be {self.allowed()}"
            unknown = [v for v in value if v not in self.choices]
            if unknown:
                return f"must be {self.allowed()}; unknown: {unknown}"
            ok = 0 < len(set(value)) == len(value)
            return None if ok else f"must be {self.allowed()}"
        if self.kind in (TEXT, PATH):
            if not isinstance(value, str):
                return f"must be {self.allowed()}"
            if self.nonempty and not value:
                return "must not be empty"
            if self.kind == PATH and value:
                path = os.path.expanduser(value)
                exists = os.path.isdir(path) if self.path_kind == "dir" else os.path.isfile(path)
                if not exists:
                    return f"{self.path_kind} does not exist"
            return None
        if self.kind == INT and not _is_int(value):
            return f"must be {self.allowed()}"
        if not (_is_int(value) or isinstance(value, float)):
            return f"must be {self.allowed()}"
        if not math.isfinite(value):
            return f"must be {self.allowed()} (not NaN or infinite)"
        return None if self._in_range(value) else f"must be {self.allowed()}"

    def _in_range(self, value: float) -> bool:
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def bad_values(self) -> list[str]:
        """Command-line values this rule rejects (for the property test): wrong type first."""
        if self.kind == BOOL:
            return ["maybe"]
        if self.kind == CHOICE:
            return ["no_such_choice"]
        if self.kind == SUBSET:
            return ["no_such_choice", "()"]
        if self.kind == PATH:
            return ["/nonexistent/cxrjax-missing"]
        if self.kind == TEXT:
            return [""] if self.nonempty else []
        if self.kind == INTS:
            empty = [] if self.allow_empty else ["()"]
            return ["abc", *empty] + ([f"({_fmt(self._below())},)"] if self._below() else [])
        out = ["abc"] if self.kind == NUMBER else ["abc", "1.5"]
        if self.kind == NUMBER:
            out += ["nan", "inf"]
        out += [_fmt(v) for v in (self._below(), self._above()) if v is not None]
        return out

    def _below(self) -> float | None:
        if self.gt is not None:
            return self.gt
        if self.ge is not None:
            return self.ge - 1
        return None

    def _above(self) -> float | None:
        if self.lt is not None:
            return self.lt
        if self.le is not None:
            return self.le + 1
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def number(**bounds) -> Rule:
    return Rule(NUMBER, **bounds)


def integer(**bounds) -> Rule:
    return Rule(INT, **bounds)


def choice(*choices: Any) -> Rule:
    return Rule(CHOICE, choices=tuple(choices))


def subset(*choices: Any) -> Rule:
    return Rule(SUBSET, choices=tuple(choices))


def text(nonempty: bool = False) -> Rule:
    return Rule(TEXT, nonempty=nonempty)


def path(kind: str = "dir", nonempty: bool = False) -> Rule:
    return Rule(PATH, path_kind=kind, nonempty=nonempty)


UNIT = {"ge": 0, "lt": 1}  # [0, 1)
# Every field of every preset (configs/*.py), by glob on the dotted name: the first match wins.
# A field no pattern matches gets a rule from its value's type (finite numbers, bools, text).
RULES: tuple[tuple[str, Rule], ...] = (
    *((f"*{name}", Rule(BOOL)) for name in ("enabled", "hflip", "remat", "conditional")),
    *((f"*{name}", Rule(BOOL)) for name in ("balanced", "skip_corrupt", "require_pretrained")),
    ("loss.cls_reals_only", Rule(BOOL)),
    ("eval.figures", Rule(BOOL)),
    ("loss.diffaugment", text()),
    ("loss.conditioning", choice("", "projection")),
    ("preset", text()),
    ("seed", integer(ge=0)),
    ("*.seed", integer(ge=0)),
    ("*keep_seed", integer(ge=0)),
    ("method", choice("fanogan", "ddpm")),
    ("generator_workdir", text()),  # checked (exists, right kind) by the anomaly driver
    # data
    ("*.name", text()),  # dataset / model / optimizer names: the drivers' RULES give choices
    ("*.manual_dir", text()),  # may be created later (experiment); builders check it
    ("*data_dir", text()),
    ("*.folder_name", text()),
    ("*_split", text(nonempty=True)),
    ("*.labels", text()),
    ("data.*_class", text()),  # keep_class, only_class, normal_class
    ("data.synthetic.label", text()),
    ("data.resolution", integer(gt=0)),
    ("data.source_resolution", integer(ge=0)),
    ("data.content_resolution", integer(ge=0)),  # PGGAN: cross-checked by its driver
    ("*.num_workers", integer(ge=0)),
    ("data.cache_mb", number(ge=0)),
    ("data.bad_records", choice("error", "mask")),
    ("*.max_bad_fraction", number(ge=0, le=1)),
    ("*.keep_fraction", number(gt=0, le=1)),
    ("data.synthetic.fraction", number(**UNIT)),
    ("data.synthetic.count", integer(ge=0)),
    ("data.synthetic.only", Rule(BOOL)),
    ("data.oversample.balance", number(ge=0)),
    ("data.oversample.count", integer(ge=0)),
    ("data.mean", number()),
    ("data.std", number(gt=0)),
    ("data.augment.rotation_deg", number(ge=0, le=180)),
    ("data.augment.fill", integer(ge=0, le=255)),
    ("data.augment.*", number(ge=0, le=1)),  # scale, translate, brightness, contrast
    # model
    ("model.block_config", Rule(INTS, ge=1)),
    ("model.dtype", text(nonempty=True)),
    ("model.stem", text(nonempty=True)),
    ("model.pretrained", path("file")),
    ("model.compression", number(gt=0, le=1)),
    ("model.dropout_rate", number(**UNIT)),
    ("model.mbstd_group_size", integer(ge=0)),
    ("model.*", integer(ge=1)),  # widths, growth rate, bottleneck size
    ("encoder.output", text(nonempty=True)),
    ("encoder.*", integer(ge=1)),
    # loss, diffusion, sampling
    ("loss.class_weighting", choice("none", "balanced", "chexnet")),
    ("loss.label_smoothing", number(**UNIT)),
    ("loss.*", number(ge=0)),
    ("diffusion.schedule", text(nonempty=True)),
    ("diffusion.prediction", text(nonempty=True)),
    ("diffusion.num_timesteps", integer(ge=1)),
    ("diffusion.label_dropout", number(ge=0, le=1)),
    ("diffusion.beta_*", number(gt=0, lt=1)),
    ("ddpm.metric", text(nonempty=True)),
    ("ddpm.t_star", integer(ge=1)),
    ("*.steps", integer(ge=1)),
    ("*.per_class", integer(ge=1)),
    ("*.eta", number(ge=0)),
    ("*guidance*", number(ge=0)),
    ("fanogan.kappa", number(ge=0)),
    ("schedule.fade_images", integer(ge=1)),
    ("schedule.stable_images", integer(ge=1)),
    ("schedule.final_stable_images", integer(ge=0)),
    # optimizer
    ("optim.schedule", text(nonempty=True)),
    ("optim.reset_opt", text(nonempty=True)),
    ("optim.lr", number(gt=0)),
    ("optim.b1", number(**UNIT)),
    ("optim.b2", number(**UNIT)),
    ("optim.momentum", number(**UNIT)),
    ("optim.eps", number(gt=0)),
    ("optim.weight_decay", number(ge=0)),
    ("optim.ema_decay", number(**UNIT)),
    ("optim.final_lr_fraction", number(ge=0, le=1)),
    ("optim.grad_clip_norm", number(ge=0)),
    ("optim.warmup_steps", integer(ge=0)),
    ("optim.plateau_factor", number(gt=0, lt=1)),
    ("optim.plateau_patience", integer(ge=0)),
    ("optim.plateau_window", integer(ge=1)),
    # training and evaluation
    ("train.nonfinite", choice("skip", "abort")),
    ("train.select", choice("best", "last")),
    ("train.batch_sizes", text()),  # "res:batch,..." parsed by the PGGAN driver
    ("*batch_size", integer(ge=1)),
    ("train.num_steps", integer(ge=1)),
    ("train.log_every", integer(ge=1)),
    ("train.keep_checkpoints", integer(ge=1)),
    ("train.*_every", integer(ge=0)),  # checkpoint / eval / sample cadence, 0 = off
    ("eval.threshold", choice("youden", "f1")),
    ("eval.bootstrap", integer(ge=0)),
    ("eval.num_examples", integer(ge=0)),
    ("eval.confidence", number(gt=0, lt=1)),
)


# ------------------------------------------------------------------------ config building blocks
# Geometric and intensity augmentation, every field off (generators learn the data as is).
AUGMENT_OFF = dict(
    enabled=False,
    rotation_deg=0.0,
    scale=0.0,
    translate=0.0,
    brightness=0.0,
    contrast=0.0,
    hflip=False,
    fill=0,
)
# Data fields that change how fast batches arrive, never which: outside every run's config
# hash, free to change on resume and to differ from a shipped generator's config.
THROUGHPUT_FIELDS = ("data.num_workers", "data.cache_mb")
# The scarce training split (mixing.scarce_indices): keep `keep_fraction` of class `keep_class`
# ("" = all records), chosen by `keep_seed`.
SCARCITY = dict(keep_class="", keep_fraction=1.0, keep_seed=0)


def data_block(*, augment: dict | None = None, **fields: Any) -> ml_collections.ConfigDict:
    """A config's `data` section: the fields every family's data has, then `fields` (which
    override them), and `augment` (default: {"enabled": False})."""
    block = dict(
        name="pneumonia_mnist",
        data_dir="",  # "" = $CXRJAX_DATA_DIR or ~/cxrjax_datasets
        manual_dir="",
        labels="",
        train_split="train",
        num_workers=0,
        # Training sets whose decoded images fit in this many MiB are decoded once and kept in
        # memory (pipeline.DecodedOnce); 0 decodes on every read. Same batches either way.
        cache_mb=1024,
        skip_corrupt=False,
        # Unreadable training images: "error" stops naming the record; "mask" swaps in the
        # next readable one and counts it, stopping above max_bad_fraction of those seen.
        bad_records="error",
        max_bad_fraction=0.01,
    )
    block.update(fields)
    block["augment"] = ml_collections.ConfigDict(dict(augment or {"enabled": False}))
    return ml_collections.ConfigDict(block)


def leaves(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, value) of every leaf field of a ConfigDict / dict."""
    for key, value in config.items() if hasattr(config, "items") else ():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict | dict):
            yield from leaves(value, f"{name}.")
        else:
            yield name, value


def rule_for(field: str, value: Any = None, rules: Sequence[tuple[str, Rule]] = RULES) -> Rule:
    """The declared rule of `field` (first matching pattern), else one from the value's type."""
    for pattern, rule in rules:
        if fnmatch.fnmatchcase(field, pattern):
            return rule
    if isinstance(value, bool):
        return Rule(BOOL)
    if isinstance(value, int | float):
        return Rule(NUMBER)
    return text()


def declared(field: str, rules: Sequence[tuple[str, Rule]] = RULES) -> bool:
    return any(fnmatch.fnmatchcase(field, pattern) for pattern, _ in rules)


def check_fields(
    config: Any,
    rules: Sequence[tuple[str, Rule]] = (),
    *,
    skip: tuple[str, ...] = (),
    prefix: str = "",
) -> None:
    """Checks every leaf of `config` against `rules` (first) then `RULES`; raises ConfigError
    `config.<prefix><field>: must be <allowed>, got <value>` for the first bad one (`prefix`
    names a section checked on its own, e.g. "classifier." inside an experiment config)."""
    table = (*rules, *RULES)
    for field, value in leaves(config):
        if any(fnmatch.fnmatchcase(field, pattern) for pattern in skip):
            continue
        rule = rule_for(field, value, table)
        if isinstance(value, bool) and rule.kind in (NUMBER, INT):
            problem = f"must be {rule.allowed()}"
        elif value is None:
            continue  # an unset optional field (FieldReference None) means "default"
        else:
            problem = rule.problem(value)
        if problem:
            raise ConfigError(f"config.{prefix}{field}: {problem}, got {value!r}")


def get(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def to_dict(config: Any) -> dict:
    return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


def config_hash(config: Any, *, ignore: tuple[str, ...] = ()) -> str:
    """A short stable hash of the resolved config (fields in `ignore` excluded, dotted)."""
    tree = to_dict(config)
    for dotted in ignore:
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    payload = json.dumps(tree, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def save_json(config: Any, path: str | os.PathLike) -> None:
    """Writes the resolved config (what actually ran) next to the results."""
    from cxrjax import fileio

    fileio.write_text(path, json.dumps(to_dict(config), indent=2, sort_keys=True, default=str))
