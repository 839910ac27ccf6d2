r"""The paper's experiment end to end (`launch.run_experiment`). Select a preset with `:NAME`.

  python -m launch.run_experiment --config=configs/experiment.py:demo --workdir=workdirs/demo

Three stages, each resumable (re-running the same command skips finished sub-runs, via their
results.json, and resumes interrupted training from their checkpoints):
  1. data + synthesis: keep `scarcity.fraction` of class `scarcity.class_name` of the training
     split (deterministic, `scarcity.seed`); train PGGAN and DDPM on that scarce split only;
     synthesize the scarce class back to `synthesis.balance` x its full training count (plus
     `synthesis.quality_per_class` images of every other class, for the quality report only);
     synthetic-image quality against held-out real images (`quality.real_split`).
  2. classifier arms, same budget and hyperparameters (`classifier`), `seeds` seeds each:
     real_scarce (a), baseline (b: + classic augmentation and class re-weighting, `baseline`),
     pggan (c) and ddpm (d) (real scarce + all synthetic images of that generator), real_full
     (e: the whole training split).
  3. evaluation on the real test split (thresholds and checkpoints from validation only):
     metrics with 95 % CIs, DeLong tests vs (a) and (b), and anomaly detection (f-AnoGAN,
     DDPM reconstruction) with generators trained on normal training images only.
Outputs in the workdir: results.json, report.md, figures/, and one sub-workdir per sub-run.

Sub-configs (`classifier`, `pggan`, `ddpm`, `anomaly_pggan`, `anomaly_ddpm`, `fanogan`,
`ddpm_score`) are the job families' own configs (configs/classifier.py, pggan.py, ddpm.py,
anomaly.py); any field can be overridden, e.g. `--config.classifier.train.num_steps=300`.
Their dataset fields are set from `data` at run time, so `data` alone points the experiment at
another dataset (`--config.data.name=image_folder --config.data.manual_dir=PATH`).

Presets (times: see each preset's comment; the machine a time was measured on is named):
  smoke               same code path, tiny models at 16 px, 2 seeds: <= 3 min on a 2-core CPU
                      (the test). Numbers are meaningless.
  demo                the README quick start: the shipped PneumoniaMNIST subset at 32 px on a
                      2-core CPU, measured 19 min 55 s end to end (see _demo). Generators train
                      for minutes, not days: expect them not to help, and the report to say so.
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

ARMS = ("real_scarce", "baseline", "pggan", "ddpm", "real_full")


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
    config.seeds = 3  # classifier seeds 0 .. seeds-1 per arm
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
    config.synthesis = ml_collections.ConfigDict(
        dict(
            # Scarce-class images to synthesize: round(balance x its full training count) minus
            # the kept real ones (balance 1 restores the original count); count > 0 overrides.
            balance=1.0,
            count=0,
            quality_per_class=200,  # other classes, for the quality report only (conditional)
            sampler="ddim",  # DDPM sampler
            steps=50,  # DDIM steps (DDPM)
            guidance=-1.0,  # DDPM classifier-free guidance; < 0 = the DDPM run's own
            batch_size=64,
            seed=1000,
        )
    )
    config.quality = ml_collections.ConfigDict(
        dict(
            enabled=True,
            extractor="pixels",  # cxrjax.features spec: pixels, cxr:<workdir>, inception:<w>
            real_split="val",  # held-out real images (never test)
            max_images=5000,  # per set, drawn at random beyond that (memory on big datasets)
            kid_subset_size=1000,
            kid_subsets=100,
            embedding="pca",
            batch_size=256,
        )
    )
    config.arms = ARMS
    # Arm (b): what it adds to arm (a); every other classifier setting is shared by all arms.
    config.baseline = ml_collections.ConfigDict(dict(augment=True, class_weighting="balanced"))
    config.classifier = classifier.get_config("tiny")
    config.classifier.data.augment.enabled = False  # arms (a), (c), (d), (e): no augmentation
    config.pggan = pggan.get_config("pneumonia_mnist")
    config.ddpm = ddpm.get_config("pneumonia_mnist")
    config.anomaly = ml_collections.ConfigDict(
        dict(
            enabled=True,
            methods=("fanogan", "ddpm"),
            normal_class="normal",
            # "dedicated": PGGAN and DDPM trained on the normal training images only
            # (anomaly_pggan / anomaly_ddpm); "shared": reuse stage 1's class-conditional
            # generators (trained on the scarce split, both classes), conditioned on normal.
            generators="dedicated",
        )
    )
    config.anomaly_pggan = pggan.get_config("pneumonia_mnist")
    config.anomaly_pggan.model.conditional = False
    config.anomaly_ddpm = ddpm.get_config("pneumonia_mnist")
    config.anomaly_ddpm.model.conditional = False
    config.fanogan = anomaly.get_config("pneumonia_mnist")
    config.ddpm_score = anomaly.get_config("pneumonia_mnist_ddpm")
    config.eval = ml_collections.ConfigDict(dict(bootstrap=1000, confidence=0.95, alpha=0.05))
    return config


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
    config.fanogan.encoder.update(base_features=4, max_features=8)
    config.fanogan.train.update(global_batch_size=8, num_steps=4, log_every=2, checkpoint_every=0)
    config.ddpm_score.ddpm.update(t_star=20, steps=2)
    for name in ("fanogan", "ddpm_score"):
        config[name].eval.update(batch_size=64, bootstrap=50, num_examples=2)
    config.eval.bootstrap = 100


def _demo(config) -> None:
    """The shipped data at 32 px, sized from step times measured on the shared 2-core CPU.

    Measured 2026-11-26 on this project's 2-core CPU (shared with other jobs; one process, XLA
    CPU): this preset took 19 min 55 s end to end at load ~1.5-2.5 (stage 1 10:05, stage 2
    3:22, stage 3 6:24): PGGAN 224 steps 145 s, DDPM 200 steps of 32 330 s, DDPM 20-step
    DDIM synthesis of 614 images 120 s, 15 DenseNetTiny arms (150 steps of 32, eval, 1000
    bootstraps) 12-18 s each, normal-only PGGAN 94 s and DDPM (100 steps) 179 s, f-AnoGAN 51 s,
    DDPM scoring 59 s. A first version with generators half as long (PGGAN 256 images per
    phase with EMA 0.999, DDPM 100 steps) took 20 min 10 s at load ~4 and gave noise-like
    synthetic images. Result of the measured run: PGGAN synthetic data made no detectable
    difference (AUC +0.001, p = 0.71), DDPM synthetic data hurt (AUC -0.28, p < 0.001).
    """
    config.data.resolution = 32
    config.seeds = 3
    # 1214 normals in the shipped train split: keep 121, synthesize 486 (to half the count).
    config.synthesis.update(balance=0.5, quality_per_class=64, steps=20)
    config.quality.update(kid_subset_size=100, kid_subsets=50)
    cls = config.classifier
    cls.data.resolution = 32
    cls.train.update(
        global_batch_size=32, num_steps=150, log_every=25, eval_every=50, checkpoint_every=50
    )
    cls.optim.update(lr=2e-3, warmup_steps=15)
    cls.eval.update(batch_size=128, bootstrap=1000)
    # PGGAN 32 px, 512 images per phase (224 steps; the standalone demo: 2048), EMA 0.95: an
    # EMA of 0.99 or more still holds much of the initial weights after so few steps.
    config.pggan.schedule.update(fade_images=512, stable_images=512)
    config.pggan.optim.ema_decay = 0.95
    config.pggan.train.update(log_every=32, checkpoint_every=64)
    # DDPM 32 px, 200 steps of 32 (the standalone demo: 500); stochastic DDIM (eta = 1).
    config.ddpm.train.update(num_steps=200, log_every=20, checkpoint_every=50, sample_every=0)
    config.ddpm.optim.update(warmup_steps=20)
    config.ddpm.sample.update(steps=20)
    # Normal-only generators for anomaly detection, shorter still.
    config.anomaly_pggan.schedule.update(fade_images=384, stable_images=384)
    config.anomaly_pggan.optim.ema_decay = 0.95
    config.anomaly_pggan.train.update(log_every=24, checkpoint_every=48)
    config.anomaly_ddpm.train.update(
        num_steps=100, log_every=20, checkpoint_every=50, sample_every=0
    )
    config.anomaly_ddpm.optim.update(warmup_steps=10)
    config.anomaly_ddpm.sample.update(steps=20)
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
    cls.loss.class_weighting = "none"  # arm (b) adds it
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
            f"unknown experiment preset {preset!r}; choose smoke, demo, kermany_binary_128, "
            "kermany_binary_256, kermany_3class_128, kermany_3class_256 or nih14_224"
        )
    return config
