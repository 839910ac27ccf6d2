"""Progressive GAN configs (Karras et al. 2018). Select a preset with `:NAME`.

  python -m launch.train_pggan --config=configs/pggan.py:pneumonia_mnist --workdir=/tmp/pggan

Presets:
  tiny             seconds; GeneratorTiny/DiscriminatorTiny to 16x16 on the shipped
                   PneumoniaMNIST subset, 128 images per phase (5 phases), for tests and smoke.
  pneumonia_mnist  CPU demo: class-conditional (AC-GAN) Demo32 nets to 32x32 on PneumoniaMNIST
                   prepared at 32 px, batch 16, 2048 images per phase (7 phases: 4 stable, then
                   fade/stable at 8, 16, 32; 896 steps), EMA 0.99. Measured 2026-11-26 on this
                   project's 2-core CPU: 10 min 33 s for the whole command; the 32 px samples
                   are coarse CXR-like images (lung fields, mediastinum), blurry and with little
                   diversity (docs/generators/README.md). The paper trains 600k images per
                   phase on GPUs; raise --config.schedule.fade_images / stable_images there.

The schedule is in images: 4x4 trains `stable_images`, then each resolution fades in over
`fade_images` and trains stable for `stable_images`. Training ends after the last stable phase.
Outputs: workdir/samples/phaseNN_RxR_{fade,stable}.png (EMA G, one row per class, fixed latents),
metrics.jsonl, checkpoints/, results.json. Re-running the same command resumes exactly.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict(
        dict(
            name="pneumonia_mnist",
            data_dir="",  # "" = $CXRJAX_DATA_DIR or ~/cxrjax_datasets
            manual_dir="",
            labels="",
            source_resolution=0,  # resolution the records are prepared at (0 = builder default)
            resolution=32,  # final PGGAN resolution: a power of two in [8, 1024]
            # Film size on that canvas: 0 = films resized to `resolution`; 0 < c < resolution
            # = films kept at c px and reflect-padded to the canvas, samples cropped back to c
            # (no resampling: 28 -> 32 -> 28 px keeps ~78 % of a film's fine detail).
            content_resolution=0,
            train_split="train",
            # Training subset ("" = every record): `only_class` keeps one class (a normal-only
            # generator for f-AnoGAN); `keep_class` keeps `keep_fraction` of that class, chosen
            # by `keep_seed` (mixing.scarce_indices), as the experiment's scarce split does.
            only_class="",
            keep_class="",
            keep_fraction=1.0,
            keep_seed=0,
            num_workers=0,
            cache_mb=1024,  # decode once when the training set fits (pipeline.DecodedOnce)
            # Class-balanced epochs (multi-class, conditional models): every class is drawn
            # equally often, so a scarce class is learnt as fast as the common ones.
            balanced=False,
            skip_corrupt=False,
            # Unreadable training images: "error" stops naming the record; "mask" swaps in the
            # next readable one and counts it, stopping above max_bad_fraction of those seen.
            bad_records="error",
            max_bad_fraction=0.01,
            augment=ml_collections.ConfigDict(dict(enabled=False)),
        )
    )
    config.model = ml_collections.ConfigDict(
        dict(name="demo32", conditional=True, mbstd_group_size=4, dtype="float32")
    )
    # cls_reals_only: D's class head learns from real images only (official AC-GAN: also fakes).
    # diffaugment: DiffAugment ops on every image D sees ("translation,cutout"; "" = off).
    # conditioning: "" = AC-GAN class head (official), "projection" = projection discriminator.
    config.loss = ml_collections.ConfigDict(
        dict(
            gp_weight=10.0,
            drift_weight=1e-3,
            cls_weight=1.0,
            cls_reals_only=False,
            diffaugment="",
            conditioning="",
        )
    )
    config.optim = ml_collections.ConfigDict(
        dict(lr=1e-3, b1=0.0, b2=0.99, eps=1e-8, ema_decay=0.999, reset_opt="phase")
    )
    # final_stable_images: length of the last (full-resolution) phase; 0 = stable_images.
    config.schedule = ml_collections.ConfigDict(
        dict(fade_images=600_000, stable_images=600_000, final_stable_images=0)
    )
    config.train = ml_collections.ConfigDict(
        dict(
            global_batch_size=16,
            # Per-resolution global batch, "from_res:batch,..." (e.g. "4:64,64:32,128:16", as the
            # official code shrinks it while growing); "" = global_batch_size everywhere.
            batch_sizes="",
            log_every=50,
            checkpoint_every=500,
            keep_checkpoints=2,
            nonfinite="skip",
        )
    )
    config.samples = ml_collections.ConfigDict(dict(per_class=8))
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "pneumonia_mnist"
    config = base_config()
    config.preset = preset
    if preset == "tiny":
        config.data.resolution = 16
        config.model.update(name="tiny", mbstd_group_size=2)
        config.schedule.update(fade_images=128, stable_images=128)
        config.train.update(global_batch_size=16, log_every=4, checkpoint_every=0)
        config.samples.per_class = 4
    elif preset == "pneumonia_mnist":
        config.data.update(source_resolution=32, resolution=32)
        config.model.update(name="demo32", conditional=True, mbstd_group_size=4)
        # Budget: the 704-images-per-phase version of this preset took 2 min 54 s on an idle
        # 2-core CPU (2026-11-26); the cost is linear in images, so 2048 per phase (128 steps
        # of 16) is ~8.5 min idle. EMA 0.99, not the paper's 0.999: over ~900 steps an EMA of
        # 0.999 still holds ~40 % of the initial weights (its samples were noise).
        config.schedule.update(fade_images=2048, stable_images=2048)
        config.optim.ema_decay = 0.99
        config.train.update(global_batch_size=16, log_every=32, checkpoint_every=128)
    elif preset == "pneumonia_mnist_scarce":
        # The experiment demo's PGGAN (configs/experiment.py:demo), trained on its scarce split
        # (1 % of the normals: 12 of 1214, scarcity seed 0) with class-balanced batches, 3072
        # images per phase and an EMA of 0.999 with warm-up. Its exported generator ships in
        # the package (cxrjax/resources/generators/); this preset is the command that
        # retrains it.
        config.data.update(
            source_resolution=28,
            resolution=32,
            content_resolution=28,
            keep_class="normal",
            keep_fraction=0.01,
            keep_seed=0,
            balanced=True,
        )
        config.model.update(name="demo32", conditional=True, mbstd_group_size=4)
        # A projection discriminator: with AC-GAN's class head (the official conditioning) the
        # judge called only 23-34 % of the synthetic normals normal; and 6144 more images at
        # 32 px, where the class-fidelity curve was still rising (benchmarks/RESULTS.md).
        # The 28 px films sit on the 32 px canvas reflect-padded, not resampled: resampling
        # 28 -> 32 -> 28 keeps 78 % of the real normals' fine detail, and the resized
        # generator's normals had 71 % of it (benchmarks/RESULTS.md, "Passing the gate...").
        config.loss.conditioning = "projection"
        # DiffAugment (all three ops, the few-shot setting of Zhao et al. 2020): D sees 12 real
        # normals ~1,150 times each and memorises them without it (benchmarks/RESULTS.md).
        config.loss.diffaugment = "color,translation,cutout"
        config.schedule.update(fade_images=3072, stable_images=3072, final_stable_images=9216)
        config.optim.ema_decay = 0.999
        config.train.update(global_batch_size=16, log_every=64, checkpoint_every=192)
    else:
        raise ValueError(
            f"unknown pggan preset {preset!r}; choose tiny, pneumonia_mnist or "
            "pneumonia_mnist_scarce"
        )
    return config
