r"""The paper's experiment end to end (`launch.run_experiment`). Select a preset with `:NAME`.

  python -m launch.run_experiment --config=configs/experiment.py:demo --workdir=workdirs/demo

Four stages, each resumable (re-running the same command skips finished sub-runs and resumes
interrupted training from checkpoints; an edited config is refused, naming the fields):
  1. data + headroom: keep `scarcity.fraction` of class `scarcity.class_name` of the training
     split (deterministic, `scarcity.seed`); train the real_scarce and real_full arms over every
     seed and measure the gap between them (`headroom.min_gap`) before any generator trains.
  2. generators + synthesis: the judge (the classifier recipe with a balanced loss on the scarce
     split); PGGAN and DDPM on the scarce split only (or the shipped exported generators of this
     exact config: `generators`); synthesize the scarce class to `synthesis.balance` x its full
     count, a judge-filtered set (`filter`), quality-only and CAS sets; class fidelity, the gate
     (`quality.fidelity_margin`), FD / KID matrix, distribution and clustering metrics in the
     judge's feature space (`quality.extractor`); CAS classifiers on synthetic images only.
  3. classifier arms at the same steps, batch and schedule, `seeds` paired seeds each:
     oversampled (the same class prior as the synthetic arms, real repeats), balanced_loss,
     augmented, pggan, ddpm, pggan_filtered, ddpm_filtered.
  4. evaluation on the real test split (thresholds and checkpoints from validation only):
     per-seed paired t and hierarchical bootstrap, Holm-corrected, every generator arm against
     the oversampled control; anomaly detection (f-AnoGAN, DDPM reconstruction; pixels and
     the judge's feature space). Then results.json, report.md and figures/.

Sub-configs (`classifier`, `pggan`, `ddpm`, `anomaly_pggan`, `anomaly_ddpm`, `fanogan`,
`ddpm_score`) are the job families' own configs (configs/classifier.py, pggan.py, ddpm.py,
anomaly.py); any field can be overridden, e.g. `--config.classifier.train.num_steps=300`.
Their dataset fields are set from `data` at run time, so `data` alone points the experiment at
another dataset (`--config.data.name=image_folder --config.data.manual_dir=PATH`).

Presets (times: see each preset's comment; the machine a time was measured on is named):
  launcher_smoke      smoke with two real-data arms only (real_scarce, oversampled; no
                      generators, quality or anomaly sub-runs): the launcher tests'
                      experiment, ~45 s on a 2-core CPU. Numbers are meaningless.
  smoke               same code path, tiny models at 16 px, 2 seeds: <= 3 min on a 2-core CPU
                      (the test). Numbers are meaningless.
  demo                the README quick start: the shipped PneumoniaMNIST subset at 28 px on a
                      2-core CPU in <= 20 min (see _demo and README for the measured time and
                      result); 1 % of the normals kept, the shipped PGGAN and DDPM (trained
                      on that scarce split beforehand), 5 seeds.
  kermany_binary_128  Kermany normal vs pneumonia, 128 px; kermany_binary_256 at 256 px.
  kermany_3class_128  normal / bacterial / viral, 128 px; kermany_3class_256 at 256 px.
  nih14_224           NIH ChestX-ray14, 14 findings (multi-label), 224 px; scarcity on a rare
                      finding (Hernia, the rarest: ~230 images in the dataset; keep 10 %);
                      unconditional generators trained on that finding's kept images.
The full-scale presets are for multi-GPU hosts; their expected runtimes are estimates, not
measurements (see the comments in get_config).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from cxrjax.experiment.design import ARMS  # noqa: E402  (the one list of arms)


def _family(name: str):
    """A sibling config module (configs/<name>.py), loaded by path like config_flags does."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_experiment_{name}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def base_config() -> ml_collections.ConfigDict:
    classifier = _family("classifier")
    pggan = _family("pggan")
    ddpm = _family("ddpm")
    anomaly = _family("anomaly")
    config = ml_collections.ConfigDict()
    config.seeds = 5  # classifier seeds 0 .. seeds-1 per arm (paired across arms)
    config.data = ml_collections.ConfigDict(
        dict(
            name="pneumonia_mnist",
            data_dir="",  # "" = $CXRJAX_DATA_DIR or ~/cxrjax_datasets
            manual_dir="",
            labels="",
            resolution=28,  # the classifier's resolution (records prepared at it)
            train_split="train",
            val_split="val",
            test_split="test",
            skip_corrupt=False,
            num_workers=0,
        )
    )
    config.scarcity = ml_collections.ConfigDict(dict(class_name="normal", fraction=0.1, seed=0))
    # The real_full - real_scarce gap (test ROC-AUC, seed-level) below which the report says
    # the run cannot show a benefit of synthetic data.
    config.headroom = ml_collections.ConfigDict(dict(min_gap=0.03))
    # "train": train PGGAN / DDPM in the run; "shipped": load the exported generators that ship
    # in the package for this exact config (cxrjax/resources/generators/), train the others.
    config.generators = "train"
    config.synthesis = ml_collections.ConfigDict(
        dict(
            # Scarce-class images to synthesize: round(balance x its full training count) minus
            # the kept real ones (balance 1 restores the original count); count > 0 overrides.
            # The oversampled control repeats real records up to the same count.
            balance=1.0,
            count=0,
            quality_per_class=200,  # other classes, for quality and class fidelity only
            sampler="ddim",  # DDPM sampler
            steps=50,  # DDIM steps (DDPM)
            guidance=-1.0,  # DDPM classifier-free guidance; < 0 = the DDPM run's own
            batch_size=64,
            seed=1000,
        )
    )
    # The judge-filtered synthetic sets (arms *_filtered): keep an image when the judge gives
    # its intended class a confidence that `keep` of real validation images of it reach.
    config.filter = ml_collections.ConfigDict(dict(keep=0.95, max_attempts_factor=4))
    config.quality = ml_collections.ConfigDict(
        dict(
            enabled=True,
            # Feature space: "judge" (the judge classifier's features), "pixels", or a
            # cxrjax.features spec (inception:<weights file>, cxr:<workdir>).
            extractor="judge",
            real_split="val",  # held-out real images (never test)
            max_images=5000,  # per set, drawn at random beyond that (memory on big datasets)
            kid_subset_size=1000,
            kid_subsets=100,
            embedding="pca",
            batch_size=256,
            # The gate: a generator is adequate when its synthetic scarce-class images are
            # judged as that class no more than this below real validation images of it.
            fidelity_margin=0.10,
            cas=True,  # classification accuracy score: train on synthetic only
            cas_per_class=0,  # images per class (0 = the scarce split's scarce-class count)
        )
    )
    config.arms = ARMS
    config.classifier = classifier.get_config("tiny")
    config.classifier.data.augment.enabled = False  # only the "augmented" arm augments
    config.classifier.eval.figures = False  # the report draws ROC curves across seeds
    config.pggan = pggan.get_config("pneumonia_mnist")
    config.pggan.data.balanced = True
    config.ddpm = ddpm.get_config("pneumonia_mnist")
    config.ddpm.data.balanced = True
    config.anomaly = ml_collections.ConfigDict(
        dict(
            enabled=True,
            methods=("fanogan", "ddpm"),
            normal_class="normal",
            # "dedicated": PGGAN and DDPM trained on the normal training images only
            # (anomaly_pggan / anomaly_ddpm); "shared": reuse stage 2's class-conditional
            # generators (trained on the scarce split, both classes), conditioned on normal.
            generators="dedicated",
            # Reconstruction error also in the judge's feature space ("judge") or pixels only.
            features="judge",
        )
    )
    config.anomaly_pggan = pggan.get_config("pneumonia_mnist")
    config.anomaly_pggan.model.conditional = False
    config.anomaly_ddpm = ddpm.get_config("pneumonia_mnist")
    config.anomaly_ddpm.model.conditional = False
    config.fanogan = anomaly.get_config("pneumonia_mnist")
    config.ddpm_score = anomaly.get_config("pneumonia_mnist_ddpm")
    config.eval = ml_collections.ConfigDict(
        dict(bootstrap=1000, hierarchical_bootstrap=1000, confidence=0.95, alpha=0.05)
    )
    # CAM overlays per arm on the same validation films: this many films per class (0 = none).
    config.figures = ml_collections.ConfigDict(dict(explain_per_class=2))
    config.launcher = launcher_config()
    return config


def launcher_config() -> ml_collections.ConfigDict:
    """Where sub-runs run (cxrjax/experiment/launchers.py): "inline" in this process, one after
    another, or "submitit": each stage's ready sub-runs as jobs (SLURM, or local processes).
    Never changes a reported number, so it may differ between invocations on one workdir."""
    return ml_collections.ConfigDict(
        dict(
            name="inline",  # "inline" or "submitit"
            cluster="auto",  # "auto" (SLURM when sbatch exists, else local), "slurm", "local"
            partition="",  # SLURM partition ("" = the cluster's default)
            account="",
            qos="",
            nodes=1,  # > 1: one job over several nodes, jax.distributed over its tasks
            tasks_per_node=1,  # one JAX process per task (usually 1 per node)
            gpus_per_node=0,
            cpus_per_task=0,  # 0 = the cluster's default
            mem_gb=0,  # 0 = the cluster's default
            timeout_min=240,  # per job; a timed-out job is requeued and resumes its checkpoint
            array_parallelism=64,  # jobs of one stage running at once
            poll_s=10.0,  # how often the experiment looks at its jobs
        )
    )


def _smoke(config) -> None:
    """Tiny everything at 16 px; batches divisible by the tests' 4 fake devices."""
    config.seeds = 2
    config.data.resolution = 16
    config.synthesis.update(balance=0.25, quality_per_class=16, steps=4, batch_size=32)
    config.quality.update(kid_subset_size=50, kid_subsets=10)
    config.classifier.data.resolution = 16
    config.classifier.train.update(
        global_batch_size=16, num_steps=24, log_every=8, eval_every=12, checkpoint_every=12
    )
    config.classifier.eval.update(batch_size=64, bootstrap=100)
    for name in ("pggan", "anomaly_pggan"):
        pggan = config[name]
        pggan.data.update(resolution=16, source_resolution=16)
        pggan.model.update(name="tiny", mbstd_group_size=2)
        pggan.schedule.update(fade_images=64, stable_images=64)
        pggan.train.update(global_batch_size=16, log_every=4, checkpoint_every=0)
        pggan.samples.per_class = 4
    for name in ("ddpm", "anomaly_ddpm"):
        ddpm = config[name]
        ddpm.data.resolution = 16
        ddpm.model.name = "unet_tiny"
        ddpm.train.update(
            global_batch_size=16, num_steps=4, log_every=2, checkpoint_every=2, sample_every=0
        )
        ddpm.optim.update(warmup_steps=2, ema_decay=0.9)
        ddpm.sample.update(steps=4, per_class=2)
    for name in ("pggan", "ddpm"):
        config[name].data.balanced = True
    config.fanogan.encoder.update(base_features=4, max_features=8)
    config.fanogan.train.update(global_batch_size=8, num_steps=4, log_every=2, checkpoint_every=0)
    config.ddpm_score.ddpm.update(t_star=20, t_star_grid=(10, 20), steps=2)
    for name in ("fanogan", "ddpm_score"):
        config[name].eval.update(batch_size=64, bootstrap=50, num_examples=2)
    config.eval.bootstrap = 100


def _demo(config) -> None:
    """The shipped data on a 2-core CPU in <= 20 min; sized from measured step times.

    Scarcity 1 % of the normals (12 of 1214) is chosen on validation so that the real_full -
    real_scarce gap leaves room for synthetic data to show a benefit (see RESULTS.md,
    "Headroom pilot"). Both generators are the shipped exports trained on this scarce split
    (cxrjax/resources/generators/*/PROVENANCE.md): the PGGAN (`configs/pggan.py:
    pneumonia_mnist_scarce`, ~28 min on the CPU) and the DDPM (unet_demo28 at the data's 28 px,
    class-balanced batches, ~5 min); `--config.generators=train` retrains both in the run.
    """
    config.data.resolution = 28
    config.seeds = 5
    config.scarcity.fraction = 0.01
    config.generators = "shipped"
    # 1214 normals in the shipped train split: keep 12; synthetic arms and the oversampled
    # control bring the normals to half the full count (607).
    # DDIM-10 with eta = 1: the shipped DDPM's normals were judged normal at 96.1 % (FD 1.48)
    # vs 99.2 % (FD 2.69) at 20 steps, in half the time (128 per class, 2026-12-02).
    config.synthesis.update(balance=0.5, quality_per_class=64, steps=10, batch_size=128)
    config.quality.update(kid_subset_size=100, kid_subsets=50)
    cls = config.classifier
    cls.data.resolution = 28
    cls.train.update(
        global_batch_size=32, num_steps=200, log_every=50, eval_every=100, checkpoint_every=100
    )
    cls.optim.update(lr=2e-3, warmup_steps=15)
    cls.eval.update(batch_size=256, bootstrap=200)
    config.pggan = _family("pggan").get_config("pneumonia_mnist_scarce")
    config.pggan.data.update(keep_fraction=config.scarcity.fraction)
    ddpm = config.ddpm
    ddpm.data.update(resolution=28, balanced=True)
    ddpm.model.name = "unet_demo28"
    ddpm.train.update(num_steps=400, log_every=50, checkpoint_every=100, sample_every=0)
    ddpm.optim.update(lr=1e-3, warmup_steps=100, ema_decay=0.999)
    ddpm.sample.update(steps=20, guidance_scale=1.0, eta=1.0)
    # Anomaly detection on the same generators, conditioned on normal (no extra training).
    config.anomaly.generators = "shared"
    config.fanogan.train.update(global_batch_size=16, num_steps=100, log_every=25)
    config.ddpm_score.ddpm.update(t_star=200, steps=5)
    for name in ("fanogan", "ddpm_score"):
        config[name].eval.update(batch_size=128, bootstrap=1000)


def _full_scale(config, *, dataset: str, labels: str, resolution: int) -> None:
    """Kermany / NIH at 128-256 px: DenseNet121 (ImageNet stem), paper-sized generators."""
    classifier = _family("classifier")
    config.data.update(name=dataset, labels=labels, resolution=resolution, num_workers=8)
    config.synthesis.update(balance=1.0, quality_per_class=1000, steps=50, batch_size=128)
    config.quality.update(kid_subset_size=1000, kid_subsets=100)
    cls = classifier.get_config("kermany_binary")
    cls.data.update(resolution=resolution, num_workers=8)
    cls.data.augment.enabled = False
    cls.loss.class_weighting = "none"  # the balanced_loss arm adds it
    cls.train.update(global_batch_size=64, num_steps=6000, eval_every=500, checkpoint_every=500)
    config.classifier = cls
    gen_resolution = 1 << (resolution - 1).bit_length()  # PGGAN: next power of two
    for name in ("pggan", "anomaly_pggan"):
        pggan = config[name]
        pggan.data.update(resolution=gen_resolution, source_resolution=resolution, num_workers=8)
        pggan.model.update(name="official1024", mbstd_group_size=4)
        pggan.schedule.update(fade_images=600_000, stable_images=600_000)
        pggan.train.update(global_batch_size=64, checkpoint_every=2000)
    unet = "unet_128" if resolution <= 128 else "unet_256"
    for name in ("ddpm", "anomaly_ddpm"):
        ddpm = config[name]
        ddpm.data.update(resolution=resolution, num_workers=8)
        ddpm.model.update(name=unet, dtype="bfloat16")
        ddpm.train.update(
            global_batch_size=64, num_steps=100_000, checkpoint_every=5000, sample_every=10_000
        )
        ddpm.optim.update(warmup_steps=1000, ema_decay=0.9999)
        ddpm.sample.update(steps=100)
    config.ddpm.sample.guidance_scale = 2.0  # class-conditional; the normal-only one is not
    config.fanogan.train.update(global_batch_size=64, num_steps=20_000, checkpoint_every=2000)
    config.fanogan.encoder.update(base_features=64, max_features=512)
    config.ddpm_score.ddpm.update(t_star=250, steps=25)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "demo"
    config = base_config()
    config.preset = preset
    if preset == "smoke":
        _smoke(config)
    elif preset == "launcher_smoke":
        _smoke(config)
        config.arms = ("real_scarce", "oversampled")
        config.quality.enabled = False
        config.anomaly.enabled = False
    elif preset == "demo":
        _demo(config)
    elif preset.startswith("kermany_"):
        # Kermany: 5232 training images (1349 normal), 624 test. Estimated (not measured) on
        # one H200: DenseNet121 bf16 at 224 px ran ~1940 img/s (benchmarks/RESULTS.md), so a
        # classifier arm of 6000 x 64 images takes ~4-10 min at 128-256 px with evaluation,
        # 15 runs ~1-2.5 h; the DDPM (unet_128/256 bf16, 51 ms/step at 256 px batch 8 on an
        # H200, unet.py) 100k steps of 64: ~10-40 h; PGGAN 600k images per phase (11-13
        # phases): ~10-30 h. About 1-3 days on one H200, ~4-10 h on 8 GPUs of one host
        # (data parallel over the "data" mesh axis; the generators dominate).
        kind, _, size = preset.removeprefix("kermany_").partition("_")
        if kind not in ("binary", "3class") or size not in ("128", "256"):
            raise ValueError(f"unknown experiment preset {preset!r}")
        _full_scale(config, dataset="kermany_pneumonia", labels=kind, resolution=int(size))
    elif preset == "nih14_224":
        # NIH ChestX-ray14: ~86.5k train+val images, 25.6k test. Hernia, the rarest finding
        # (~230 images in the whole dataset), is the scarce one: 10 % of its training images
        # are kept, a few dozen at most. Estimated (not measured): a DenseNet121 arm of 30k x 64
        # images at 224 px ~20-30 min on one H200 (1940 img/s), 15 runs ~6-8 h; the generators
        # (overfitting is the expected finding: see the memorisation rate) for the same budgets
        # as Kermany: ~1-3 days on one H200, ~0.5 day on 8 GPUs.
        _full_scale(config, dataset="nih_chest_xray14", labels="", resolution=224)
        classifier = _family("classifier")
        cls = classifier.get_config("nih14")
        cls.data.augment.enabled = False
        cls.loss.class_weighting = "none"
        config.classifier = cls
        config.scarcity.update(class_name="Hernia", fraction=0.1)
        # Multi-label: no class conditioning; the generators learn the scarce finding only.
        for name in ("pggan", "ddpm"):
            config[name].model.conditional = False
        config.ddpm.sample.guidance_scale = 0.0
        config.anomaly.normal_class = "No Finding"
    else:
        raise ValueError(
            f"unknown experiment preset {preset!r}; choose smoke, launcher_smoke, demo, "
            "kermany_binary_128, kermany_binary_256, kermany_3class_128, kermany_3class_256 or "
            "nih14_224"
        )
    return config
