"""What an experiment runs: its arms, every sub-run's config, their order, and validation.

Nothing here reads data or trains; `validate` checks a whole experiment config (and every
sub-run config it implies) before any work, and `plan` lists the sub-runs.

Arms (all at the same optimizer steps, batch and schedule; each isolates one change against
`real_scarce`):
  real_scarce       the scarce training split as is
  oversampled       the scarce class's own records repeated up to the synthetic arms' count:
                    the same class prior as the synthetic arms, no new images (the primary
                    control for every generator arm: what a practitioner does without one)
  balanced_loss     class-balanced loss weights
  augmented         classic augmentation
  pggan / ddpm      + that generator's synthetic images of the scarce class (same prior)
  *_filtered        + the judge-filtered synthetic set of that generator (same count)
  real_full         the whole real training split (the headroom: what real data would give)
"""

from __future__ import annotations

import os

import ml_collections

from cxrjax import config as config_lib

ARMS = (
    "real_scarce",
    "oversampled",
    "balanced_loss",
    "augmented",
    "pggan",
    "ddpm",
    "pggan_filtered",
    "ddpm_filtered",
    "real_full",
)
ARM_LABELS = {
    "real_scarce": "real scarce",
    "oversampled": "real scarce, scarce class oversampled (same prior)",
    "balanced_loss": "real scarce, class-balanced loss",
    "augmented": "real scarce + augmentation",
    "pggan": "real scarce + PGGAN synthetic",
    "ddpm": "real scarce + DDPM synthetic",
    "pggan_filtered": "real scarce + PGGAN synthetic, judge-filtered",
    "ddpm_filtered": "real scarce + DDPM synthetic, judge-filtered",
    "real_full": "full real training data",
}
GENERATORS = ("pggan", "ddpm")
BASELINE = "real_scarce"
CONTROL = "oversampled"  # the primary comparison of every synthetic arm
METRICS = ("auc", "precision", "recall", "specificity", "f1", "accuracy")
ANOMALY_METHODS = ("fanogan", "ddpm")
STAGES = ("data_and_headroom", "generators_and_synthesis", "classifier_arms", "evaluation")
GENERATOR_SOURCES = ("train", "shipped")
QUALITY_SPACES = ("judge", "pixels")  # besides any cxrjax.features spec
EMBEDDINGS = ("pca", "tsne")  # cxrjax.quality.EMBEDDINGS (not imported: configs load this)

# Sections of an experiment config that are a job family's own config (configs/<family>.py):
# section -> driver kind. Each is checked with its driver's RULES, the rest with RULES below.
SECTIONS = {
    "classifier": "classifier",
    "pggan": "pggan",
    "ddpm": "ddpm",
    "fanogan": "anomaly",
    "ddpm_score": "anomaly",
    "anomaly_pggan": "pggan",
    "anomaly_ddpm": "ddpm",
}
_r = config_lib
# The experiment's own fields (besides config.RULES and the launcher's, launchers.RULES).
RULES: tuple[tuple[str, config_lib.Rule], ...] = (
    ("arms", _r.subset(*ARMS)),
    ("seeds", _r.integer(ge=1)),
    ("generators", _r.choice(*GENERATOR_SOURCES)),
    ("scarcity.class_name", _r.text(nonempty=True)),
    ("scarcity.fraction", _r.number(gt=0, le=1)),
    ("synthesis.balance", _r.number(ge=0)),
    ("synthesis.count", _r.integer(ge=0)),
    ("synthesis.quality_per_class", _r.integer(ge=0)),
    ("synthesis.sampler", _r.choice("ddim", "ddpm")),
    ("synthesis.guidance", _r.number()),  # < 0: each DDPM run's own guidance
    ("filter.keep", _r.number(gt=0, le=1)),
    ("filter.max_attempts_factor", _r.integer(ge=1)),
    ("quality.cas", _r.Rule(config_lib.BOOL)),
    ("quality.extractor", _r.text(nonempty=True)),
    ("quality.embedding", _r.choice(*EMBEDDINGS)),
    ("quality.fidelity_margin", _r.number(ge=0, le=1)),
    ("quality.kid_*", _r.integer(ge=1)),
    ("quality.*per_class", _r.integer(ge=0)),  # 0: the scarce split's scarce-class count
    ("quality.max_images", _r.integer(ge=0)),  # 0: all
    ("headroom.min_gap", _r.number(ge=0)),
    ("anomaly.generators", _r.choice("dedicated", "shared")),
    ("anomaly.features", _r.choice("judge", "pixels")),
    ("anomaly.methods", _r.subset(*ANOMALY_METHODS)),
    ("anomaly.normal_class", _r.text(nonempty=True)),
    ("eval.alpha", _r.number(gt=0, lt=1)),
    ("eval.hierarchical_bootstrap", _r.integer(ge=0)),
    ("figures.explain_per_class", _r.integer(ge=0)),  # 0: no explanation figure
)


def arm_generator(arm: str) -> str | None:
    """The generator an arm's synthetic images come from (None: a real-data arm)."""
    kind = arm.removesuffix("_filtered")
    return kind if kind in GENERATORS else None


def is_filtered(arm: str) -> bool:
    return arm.endswith("_filtered")


def synthetic_arms(config) -> tuple[str, ...]:
    return tuple(a for a in config.arms if arm_generator(a))


def needed_generators(config) -> tuple[str, ...]:
    return tuple(g for g in GENERATORS if any(arm_generator(a) == g for a in config.arms))


def needs_judge(config) -> bool:
    """The judge classifier serves quality (fidelity, features), the filter and CAS."""
    return bool(needed_generators(config)) and (
        bool(config.quality.enabled) or any(is_filtered(a) for a in config.arms)
    )


def comparisons(config) -> list[tuple[str, str]]:
    """(arm, reference) pairs tested and Holm-corrected together; the generator arms' primary
    reference is the oversampled control (when it runs), the others' is real_scarce."""
    arms = tuple(config.arms)
    out = []
    for arm in arms:
        if arm in (BASELINE, "real_full"):
            continue
        if arm_generator(arm) and CONTROL in arms:
            out.append((arm, CONTROL))
        elif BASELINE in arms and arm != BASELINE:
            out.append((arm, BASELINE))
    return out


# ----------------------------------------------------------------------------- sub-configs
def _copy(config) -> ml_collections.ConfigDict:
    """An unlocked deep copy of a (possibly locked) sub-config."""
    return ml_collections.ConfigDict(config_lib.to_dict(config))


def _set_data(sub, data, *, resolution: bool) -> None:
    """The experiment's dataset identity and splits into a sub-config's data block."""
    for field in ("name", "data_dir", "manual_dir", "labels", "skip_corrupt", "num_workers"):
        sub.data[field] = data[field]
    sub.data.train_split = data.train_split
    for role in ("val_split", "test_split"):
        if role in sub.data:
            sub.data[role] = data[role]
    if resolution:
        sub.data.resolution = data.resolution


def _keep(sub, scarcity) -> None:
    sub.data.update(
        keep_class=scarcity.class_name,
        keep_fraction=float(scarcity.fraction),
        keep_seed=int(scarcity.seed),
    )


def generator_config(config, kind: str) -> ml_collections.ConfigDict:
    """PGGAN / DDPM on the scarce training split (unconditional ones: its scarce class only)."""
    sub = _copy(config[kind])
    _set_data(sub, config.data, resolution=False)
    if kind == "pggan" and not sub.data.source_resolution:
        sub.data.source_resolution = config.data.resolution
    _keep(sub, config.scarcity)
    if not sub.model.conditional:
        sub.data.only_class = config.scarcity.class_name
        sub.data.balanced = False
    return sub


def anomaly_generator_config(config, kind: str) -> ml_collections.ConfigDict:
    """PGGAN / DDPM trained on the normal training images only (for anomaly detection)."""
    sub = _copy(config[f"anomaly_{kind}"])
    _set_data(sub, config.data, resolution=False)
    if kind == "pggan" and not sub.data.source_resolution:
        sub.data.source_resolution = config.data.resolution
    sub.data.only_class = config.anomaly.normal_class
    sub.data.balanced = False
    return sub


def synthetic_dir(workdir: str, arm_or_set: str) -> str:
    return os.path.join(workdir, "synthetic", arm_or_set)


def classifier_config(config, arm: str, seed: int, workdir: str) -> ml_collections.ConfigDict:
    """One arm's classifier config: the shared recipe plus the one thing the arm changes."""
    sub = _copy(config.classifier)
    _set_data(sub, config.data, resolution=True)
    sub.seed = int(seed)
    sub.eval.update(bootstrap=int(config.eval.bootstrap), confidence=float(config.eval.confidence))
    if arm != "real_full":
        _keep(sub, config.scarcity)
    if arm == "oversampled":
        sub.data.oversample.update(
            balance=float(config.synthesis.balance) if not config.synthesis.count else 0.0,
            count=int(config.synthesis.count),
        )
    elif arm == "balanced_loss":
        sub.loss.class_weighting = "balanced"
    elif arm == "augmented":
        sub.data.augment.enabled = True
    kind = arm_generator(arm)
    if kind:
        sub.data.synthetic.update(
            manual_dir=synthetic_dir(workdir, arm),
            folder_name="",  # named from the folder path: a moved workdir prepares anew
            data_dir=os.path.join(workdir, "datasets"),
            count=0,  # every synthesized image
            fraction=0.0,
            label="" if config[kind].model.conditional else config.scarcity.class_name,
        )
    return sub


def judge_config(config) -> ml_collections.ConfigDict:
    """The judge: the arms' classifier on the scarce split the generators saw, with a
    class-balanced loss (its argmax is then not pulled to the common class) and the last
    checkpoint (validation chooses nothing about it)."""
    sub = classifier_config(config, BASELINE, 0, "/unused")
    sub.loss.class_weighting = "balanced"
    sub.train.select = "last"
    return sub


def cas_config(config, name: str, workdir: str) -> ml_collections.ConfigDict:
    """Classification accuracy score: the judge's recipe trained on one image folder only
    (`synthetic/<kind>_cas`, or the real control `synthetic/real_cas`), tested on real
    validation images."""
    sub = judge_config(config)
    sub.data.update(keep_class="", keep_fraction=1.0, keep_seed=0)
    sub.data.synthetic.update(
        manual_dir=synthetic_dir(workdir, f"{name}_cas"),
        folder_name="",
        data_dir=os.path.join(workdir, "datasets"),
        count=0,
        fraction=0.0,
        label="",
        only=True,
    )
    return sub


def anomaly_config(config, method: str, workdir: str) -> ml_collections.ConfigDict:
    sub = _copy(config["fanogan" if method == "fanogan" else "ddpm_score"])
    kind = "pggan" if method == "fanogan" else "ddpm"
    if config.anomaly.generators == "dedicated":
        sub.generator_workdir = os.path.join(workdir, "anomaly", f"{kind}_normal")
    else:
        sub.generator_workdir = os.path.join(workdir, kind)
    sub.data.update(
        name=config.data.name,
        data_dir=config.data.data_dir,
        manual_dir=config.data.manual_dir,
        labels=config.data.labels,
        normal_class=config.anomaly.normal_class,
        train_split=config.data.train_split,
        val_split=config.data.val_split,
        test_split=config.data.test_split,
        num_workers=config.data.num_workers,
    )
    if config.anomaly.features == "judge":
        sub.eval.features = f"cxr:{os.path.join(workdir, 'judge')}"
    return sub


def cas_names(config) -> tuple[str, ...]:
    if not (config.quality.enabled and config.quality.cas and needs_judge(config)):
        return ()
    return (*needed_generators(config), "real")


def plan(config, workdir: str) -> dict[str, tuple[str, str, ml_collections.ConfigDict]]:
    """Every sub-run: {name: (driver kind, sub-workdir, config)}, in run order."""
    runs: dict[str, tuple[str, str, ml_collections.ConfigDict]] = {}

    def arm_runs(arms):
        for arm in arms:
            for seed in range(int(config.seeds)):
                runs[f"arms/{arm}/seed{seed}"] = (
                    "classifier",
                    os.path.join(workdir, "arms", arm, f"seed{seed}"),
                    classifier_config(config, arm, seed, workdir),
                )

    # Stage 1: the headroom arms first (before any generator trains).
    arm_runs([a for a in (BASELINE, "real_full") if a in config.arms])
    if needs_judge(config):
        runs["judge"] = ("classifier", os.path.join(workdir, "judge"), judge_config(config))
    for kind in needed_generators(config):
        runs[kind] = (kind, os.path.join(workdir, kind), generator_config(config, kind))
    for name in cas_names(config):
        runs[f"cas/{name}"] = (
            "classifier",
            os.path.join(workdir, "cas", name),
            cas_config(config, name, workdir),
        )
    arm_runs([a for a in config.arms if a not in (BASELINE, "real_full")])
    if config.anomaly.enabled:
        if config.anomaly.generators == "dedicated":
            for method in config.anomaly.methods:
                kind = "pggan" if method == "fanogan" else "ddpm"
                name = f"anomaly/{kind}_normal"
                runs[name] = (
                    kind,
                    os.path.join(workdir, name),
                    anomaly_generator_config(config, kind),
                )
        for method in config.anomaly.methods:
            runs[f"anomaly/{method}"] = (
                "anomaly",
                os.path.join(workdir, "anomaly", method),
                anomaly_config(config, method, workdir),
            )
    return runs


def stage_of(name: str) -> int:
    """1-based stage number of a sub-run (for progress lines)."""
    if name.startswith(("arms/real_scarce/", "arms/real_full/")):
        return 1
    if name in GENERATORS or name == "judge" or name.startswith("cas/"):
        return 2
    if name.startswith("arms/"):
        return 3
    return 4


def driver(kind: str):
    """The job family's driver module of a sub-run kind."""
    if kind == "classifier":
        from cxrjax.train import classifier_run as module
    elif kind == "pggan":
        from cxrjax.train import gan_run as module
    elif kind == "ddpm":
        from cxrjax.train import diffusion_run as module
    else:
        from cxrjax.train import anomaly_run as module
    return module


def training_splits(kind: str, sub) -> list[str]:
    """The dataset splits a sub-run trains on (anomaly: the generator's and the encoder's)."""
    if kind == "anomaly":
        return [sub.data.train_split]
    splits = [] if sub.data.get("synthetic", {}).get("only", False) else [sub.data.train_split]
    if kind == "classifier" and sub.data.synthetic.manual_dir:
        splits.append("synthetic")
    return splits


# ----------------------------------------------------------------------------- validation
def _own_rules() -> tuple[tuple[str, config_lib.Rule], ...]:
    from cxrjax.experiment import launchers  # submitit: not for every config load

    return (*RULES, *launchers.RULES, *config_lib.RULES)


def field_rule(field: str, value=None) -> config_lib.Rule:
    """The rule of one dotted field of an experiment config (a section's: its driver's)."""
    section, _, rest = field.partition(".")
    if section in SECTIONS and rest:
        table = (*driver(SECTIONS[section]).RULES, *config_lib.RULES)
        return config_lib.rule_for(rest, value, table)
    return config_lib.rule_for(field, value, _own_rules())


def check_fields(config) -> None:
    """Every field's type and range, named as the user gives it (`config.classifier.optim.lr`):
    the experiment's own by RULES, each family section by its driver's RULES."""
    config_lib.check_fields(config, _own_rules(), skip=tuple(f"{s}.*" for s in SECTIONS))
    for section, kind in SECTIONS.items():
        config_lib.check_fields(config[section], driver(kind).RULES, prefix=f"{section}.")


def validate(config, workdir: str | None = None) -> None:
    """Every experiment field and every sub-run config, checked before any data read."""
    check_fields(config)
    check = config_lib.check
    data = config.data
    from cxrjax.data import builders

    train, val, test = (
        builders.canonical_split(data[f"{r}_split"]) for r in ("train", "val", "test")
    )
    check(train != test, "data.train_split", "must differ from test_split")
    check(val != test, "data.val_split", "must differ from test_split")
    check(val != train, "data.val_split", "must differ from train_split")
    synthesis = config.synthesis
    check(
        synthesis.balance > 0 or synthesis.count > 0,
        "synthesis.balance",
        "must be > 0 (or synthesis.count > 0)",
    )
    check(
        builders.canonical_split(config.quality.real_split) != test,
        "quality.real_split",
        "must not be the test split (the test split only gives the final numbers)",
    )
    if config.quality.enabled and config.quality.extractor not in QUALITY_SPACES:
        from cxrjax import features

        features.parse_spec(config.quality.extractor)
    from cxrjax.experiment import launchers

    launchers.validate(config.launcher)
    methods = tuple(config.anomaly.methods)
    if config.anomaly.enabled and config.anomaly.generators == "shared":
        for method in methods:
            kind = "pggan" if method == "fanogan" else "ddpm"
            check(
                kind in needed_generators(config),
                "anomaly.generators",
                f"'shared' needs the {kind} arm (its generator); use 'dedicated'",
            )
    if config.anomaly.enabled and config.anomaly.features == "judge":
        check(
            needs_judge(config),
            "anomaly.features",
            "'judge' needs a generator arm with quality or a filtered arm; use 'pixels'",
        )
    runs = plan(config, workdir or "/nonexistent-experiment-workdir")
    for name, (kind, _, sub) in runs.items():
        checked = _copy(sub)
        if kind == "classifier":
            checked.data.synthetic.manual_dir = ""  # synthetic folders do not exist yet
            checked.data.synthetic.only = False
        if kind == "anomaly":
            checked.eval.features = ""  # the judge does not exist yet
        try:
            driver(kind).validate(checked)
        except config_lib.ConfigError as error:
            raise config_lib.ConfigError(f"{name}: {error}") from None
        for split in training_splits(kind, sub):
            check(
                builders.canonical_split(split) != test,
                "data",
                f"{name} would train on the test split",
            )
