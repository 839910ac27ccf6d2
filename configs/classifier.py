"""DenseNet classifier configs (CheXNet-style). Select a preset with `:NAME`.

  python -m launch.train_classifier --config=configs/classifier.py:pneumonia_mnist \
      --workdir=/tmp/cls

Presets:
  tiny             seconds; 2-block DenseNet on the shipped data, for tests and smoke runs.
  pneumonia_mnist  the default quality run: a DenseNet121-depth network (growth 12, small
                   stem) on the shipped 28x28 PneumoniaMNIST subset, 2-core CPU, <= 15 min;
                   expected test ROC-AUC >= 0.97 (measured numbers in README).
  kermany_binary   Kermany chest_xray at 224 px, normal vs pneumonia (ImageNet stem), 1+ GPU.
  kermany_3class   Kermany at 224 px, normal / bacterial / viral.
  nih14            NIH ChestX-ray14 at 224 px, 14 findings, multi-label (CheXNet recipe:
                   Adam 1e-3, batch 16 per GPU in the paper; here global 64, plateau decay).
  image_folder     a folder of class-named subfolders or with a labels.csv
                   (--config.data.manual_dir=PATH).
  chexnet          the CheXNet recipe as published (Rajpurkar et al. 2017; cxrjax/chexnet.py):
                   NIH ChestX-ray14, 224 px, DenseNet121 from torchvision's ImageNet weights
                   (--config.model.pretrained=densenet121-a639ec97.pth, a local file; nothing
                   downloads), horizontal flips only, batch 16, Adam 1e-3, lr / 10 when the
                   validation loss stops improving (evaluated about once an epoch), per-finding
                   weighted BCE (w+ = N_neg/N, w- = N_pos/N); results.md puts the 14 test AUCs
                   and their mean beside the paper's (mean 0.841). One GPU; ~4,900 steps per
                   epoch of the official train split; not run end to end here.
  chexnet_cpu      the same recipe at 64 px for a CPU: DenseNet121 at 64 px, 600 steps of 16,
                   evaluation every 100 steps; minutes per hundred steps on 2 cores. A way to
                   try the pipeline, not to reproduce the numbers.

    python -m launch.train_classifier --config=configs/classifier.py:chexnet_cpu \
        --workdir=/tmp/chexnet --config.data.manual_dir=~/data/nih \
        --config.model.pretrained=~/weights/densenet121-a639ec97.pth

Every field can be overridden: `--config.optim.lr=3e-4 --config.train.num_steps=2000`.
"""

from __future__ import annotations

import ml_collections

from cxrjax import config as config_lib
from cxrjax.models import densenet


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """All DenseNet fields spelled out, filled from the named class's defaults."""
    cls = densenet.MODELS[name]
    fields = {field: getattr(cls, field) for field in densenet.FIELDS}
    fields["block_config"] = tuple(fields["block_config"])
    fields.update(name=name, dtype="float32", pretrained="")
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = config_lib.data_block(
        labels="",  # dataset-specific label variant, e.g. "binary" / "3class"
        resolution=28,
        val_split="val",
        test_split="test",
        balanced=False,
        **config_lib.SCARCITY,
        # Synthetic images mixed into training (mixing.mix): a folder of class folders as
        # launch.synthesize writes it, prepared as an image_folder dataset at
        # data.resolution; every split of that folder counts as training data.
        synthetic=ml_collections.ConfigDict(
            dict(
                manual_dir="",  # "" = no synthetic data
                folder_name="",  # its image_folder name ("" = derived from the path)
                data_dir="",  # where to prepare it ("" = data.data_dir)
                count=0,  # synthetic records drawn (without replacement); 0 = all
                fraction=0.0,  # or: their share of the mixed training set (0 = use count)
                label="",  # "" = by class folder name; a class name = that class for all
                # True: train on the synthetic images alone (classification accuracy
                # score, Ravuri & Vinyals 2019); validation and test stay real.
                only=False,
            )
        ),
        # The same-prior control for synthetic data: repeat the kept records of
        # data.keep_class until that class holds round(balance x its full training count)
        # records (balance > 0), or its kept count + `count` (count > 0).
        oversample=ml_collections.ConfigDict(dict(balance=0.0, count=0)),
        mean=0.5,  # classifier normalisation: (x / 255 - mean) / std
        std=0.25,
        augment=dict(
            enabled=True,
            rotation_deg=10.0,
            scale=0.1,
            translate=0.08,
            brightness=0.1,
            contrast=0.1,
            hflip=False,
            fill=0,
        ),
    )
    config.model = model_config("densenet121", stem="small")
    config.loss = ml_collections.ConfigDict(dict(label_smoothing=0.0, class_weighting="none"))
    config.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=1e-3,
            b1=0.9,
            b2=0.999,
            momentum=0.9,
            weight_decay=1e-4,
            schedule="cosine",
            warmup_steps=100,
            final_lr_fraction=0.01,
            grad_clip_norm=0.0,
            plateau_factor=0.1,
            plateau_patience=5,
            plateau_window=50,
            ema_decay=0.0,
        )
    )
    config.train = ml_collections.ConfigDict(
        dict(
            global_batch_size=64,
            num_steps=2000,
            log_every=50,
            eval_every=250,
            checkpoint_every=250,
            keep_checkpoints=2,
            select="best",  # evaluate the best-by-val-AUC or the "last" checkpoint
            nonfinite="skip",
        )
    )
    config.eval = ml_collections.ConfigDict(
        dict(
            batch_size=256,
            threshold="youden",
            bootstrap=1000,
            confidence=0.95,
            # roc.png and reliability.png in the workdir (~0.5 s of matplotlib per run; the
            # experiment draws its own figures across seeds and turns these off).
            figures=True,
        )
    )
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "pneumonia_mnist"
    config = base_config()
    config.preset = preset
    if preset == "tiny":
        config.model = model_config("densenet_tiny")
        config.train.update(
            global_batch_size=16, num_steps=12, log_every=4, eval_every=6, checkpoint_every=6
        )
        config.optim.update(warmup_steps=2)
        config.eval.update(batch_size=64, bootstrap=50)
    elif preset == "pneumonia_mnist":
        # DenseNet121's depth at growth 12 fits a 2-core CPU budget (DenseNet121 itself runs
        # ~7x slower here; select it with --config.model=... on a GPU).
        config.model = model_config("densenet121_k12")
        config.train.update(num_steps=500, eval_every=100, checkpoint_every=100)
        config.optim.update(lr=2e-3, warmup_steps=50)
    elif preset in ("kermany_binary", "kermany_3class"):
        config.data.update(
            name="kermany_pneumonia",
            labels="binary" if preset == "kermany_binary" else "3class",
            resolution=224,
            num_workers=8,
            mean=0.485,
            std=0.229,
        )
        config.model = model_config("densenet121", stem="imagenet")
        config.loss.class_weighting = "balanced"
        config.train.update(
            global_batch_size=64, num_steps=6000, eval_every=500, checkpoint_every=500
        )
    elif preset == "nih14":
        config.data.update(
            name="nih_chest_xray14", resolution=224, num_workers=16, mean=0.485, std=0.229
        )
        config.model = model_config("densenet121", stem="imagenet")
        config.loss.class_weighting = "balanced"
        config.optim.update(
            name="adam", lr=1e-3, weight_decay=0.0, schedule="plateau", warmup_steps=0
        )
        config.train.update(
            global_batch_size=64, num_steps=30000, eval_every=1000, checkpoint_every=1000
        )
    elif preset in ("chexnet", "chexnet_cpu"):
        _chexnet(config, cpu=preset == "chexnet_cpu")
    elif preset == "image_folder":
        config.data.update(name="image_folder", resolution=128, num_workers=4)
        config.model = model_config("densenet121", stem="imagenet")
        config.loss.class_weighting = "balanced"
    else:
        raise ValueError(
            f"unknown classifier preset {preset!r}; choose tiny, pneumonia_mnist, kermany_binary, "
            "kermany_3class, nih14, chexnet, chexnet_cpu or image_folder"
        )
    return config


def _chexnet(config: ml_collections.ConfigDict, *, cpu: bool) -> None:
    """Rajpurkar et al. 2017 as published (module docstring); `cpu`: 64 px, few steps."""
    config.data.update(
        name="nih_chest_xray14",
        resolution=64 if cpu else 224,
        num_workers=2 if cpu else 16,
        mean=0.485,  # ImageNet statistics (the red channel's; the stem sums RGB filters)
        std=0.229,
    )
    # The paper's only augmentation: random horizontal flips.
    config.data.augment.update(
        rotation_deg=0.0, scale=0.0, translate=0.0, brightness=0.0, contrast=0.0, hflip=True
    )
    config.model = model_config("densenet121", stem="imagenet")
    config.model.require_pretrained = True  # ImageNet initialisation is part of the recipe
    config.loss.class_weighting = "chexnet"
    config.optim.update(
        name="adam",
        lr=1e-3,
        b1=0.9,
        b2=0.999,
        weight_decay=0.0,
        schedule="val_plateau",
        warmup_steps=0,
        plateau_factor=0.1,
        plateau_patience=1,  # divide by 10 after an evaluation without a better val loss
    )
    if cpu:
        config.train.update(
            global_batch_size=16, num_steps=600, eval_every=100, checkpoint_every=100
        )
        config.eval.update(batch_size=64, bootstrap=200)
    else:
        # eval_every ~ one epoch: the official train_val list minus 10 % validation patients
        # holds ~77,900 images, / 16 per step.
        config.train.update(
            global_batch_size=16, num_steps=49000, eval_every=4900, checkpoint_every=4900
        )
