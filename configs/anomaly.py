r"""Anomaly detection configs: f-AnoGAN (izi_f) on a PGGAN run, or DDPM partial diffusion.

  python -m launch.train_anomaly --config=configs/anomaly.py:pneumonia_mnist \
      --workdir=workdirs/anomaly_fanogan \
      --config.generator_workdir=workdirs/pggan_pneumonia_mnist

Normal images are those of `data.normal_class`; every other class is abnormal. f-AnoGAN trains
an encoder on the normal training images against the frozen generator (EMA) and discriminator
of the PGGAN run in `generator_workdir`, then scores validation and test; the DDPM method has
nothing to train and only scores (partial diffusion to `ddpm.t_star`, DDIM back). The
decision threshold is chosen on validation and applied once to test.

Every score is oriented in advance, higher = more anomalous, and is never flipped: a score
whose validation ROC-AUC is below 0.5 gets a plain warning in results.json ("warnings") and
results.md. With `eval.features` set (e.g. cxr:<classifier workdir>), both methods also score
||phi(x) - phi(x_hat)||^2 / D in the classifier's pooled feature space (D features), and
results.json reports both spaces (results["scores"]["pixels" | "features"]), the top-level
val/test being the `eval.primary` one (results["primary_score"]). `ddpm.t_star_grid` picks
the DDPM's t* on validation (results["t_star_selection"]). Caveat: a cxr: classifier trained
on these normal/abnormal labels has seen abnormal images and their labels, so its feature
space is no longer normal-only; say which classifier was used when reporting the score.

Presets:
  tiny                  seconds; a ~2k-parameter encoder, 6 steps of batch 8; for tests. Needs
                        --config.generator_workdir (a tiny PGGAN run, e.g. configs/pggan.py:tiny).
  pneumonia_mnist       the CPU demo on the shipped PneumoniaMNIST subset (normal vs
                        pneumonia), f-AnoGAN on the 32 px `configs/pggan.py:pneumonia_mnist` run
                        (default workdir workdirs/pggan_pneumonia_mnist). Encoder widths
                        32..128 (0.86 M params), Adam 1e-3, batch 16, 200 steps over the 1214
                        normal training images (~2.6 epochs), kappa = 1. About 2.5-4.5 min on
                        the shared 2-core CPU (estimated from driver-measured step and
                        scoring times on a stand-in PGGAN, see get_config; not a full run).
                        The test AUC depends on how good the PGGAN is; a ~15 min CPU PGGAN is
                        a weak generator, so expect a modest AUC, not the classifier's 0.99.
  pneumonia_mnist_ddpm  the DDPM method on the `configs/ddpm.py:pneumonia_mnist` run (default
                        workdirs/ddpm_pneumonia_mnist): noise to t*, 10 DDIM steps back,
                        conditioned on "normal"; t* chosen on validation from
                        ddpm.t_star_grid = (100, 200, 300, 500), then test scored once.
                        Measured 2026-11-26 at a fixed t* = 200 (no grid) on the 300-step
                        DDPM demo run, shared 2-core CPU: whole command 3 min 50 s; test
                        ROC-AUC 0.23 [0.19, 0.27], i.e. below chance: that DDPM reconstructs
                        the hazier pneumonia images with *lower* pixel error than normals.
                        The grid adds 3 validation passes (4 instead of 1; not yet timed);
                        results.json now warns when a score is below chance on validation.
                        Add --config.eval.features=cxr:<classifier workdir> to score in the
                        classifier's feature space as well.

Writes to the workdir: config.json, and for f-AnoGAN metrics.jsonl, tensorboard/ and
checkpoints/ (the encoder, with the data iterator; re-running resumes exactly); then
results.json (val/test ROC-AUC, PR-AUC, threshold metrics, 95 % bootstrap CIs for test),
results.md, roc.png, residuals.png (input / reconstruction / |residual| for a few normal and
abnormal test images) and {val,test}_scores.npz. A finished workdir returns its saved
results.
"""

from __future__ import annotations

import ml_collections

from cxrjax import config as config_lib

METHODS = ("fanogan", "ddpm")


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.method = "fanogan"  # "fanogan" (PGGAN workdir) or "ddpm" (DDPM workdir)
    config.generator_workdir = ""  # the trained generator run (required)
    config.data = config_lib.data_block(
        # "" = the generator run's own dataset, data_dir, manual_dir and label variant.
        name="",
        normal_class="normal",  # every other class counts as abnormal
        val_split="val",
        test_split="test",
    )
    # f-AnoGAN encoder (cxrjax.models.encoder): widths double per halving from base to max.
    config.encoder = ml_collections.ConfigDict(
        dict(base_features=32, max_features=128, output="sphere")
    )
    config.fanogan = ml_collections.ConfigDict(dict(kappa=1.0))
    config.optim = ml_collections.ConfigDict(
        dict(
            name="adam",
            lr=1e-3,
            b1=0.9,
            b2=0.999,
            schedule="constant",
            warmup_steps=0,
            grad_clip_norm=0.0,
        )
    )
    config.train = ml_collections.ConfigDict(
        dict(
            global_batch_size=32,
            num_steps=300,
            log_every=25,
            checkpoint_every=100,
            keep_checkpoints=2,
            nonfinite="skip",
        )
    )
    # DDPM partial diffusion: noise to index t_star (of the run's T), `steps` DDIM steps back.
    # t_star_grid: () = use t_star; else (t_star unused) score validation at every t* of the
    # grid, keep the best validation ROC-AUC (primary space; first on ties) and score test
    # once, at that t*.
    config.ddpm = ml_collections.ConfigDict(
        dict(t_star=200, t_star_grid=(), steps=10, metric="mse", eta=0.0, guidance=0.0)
    )
    config.eval = ml_collections.ConfigDict(
        dict(
            batch_size=64,
            threshold="youden",  # or "f1"; chosen on validation, applied to test
            bootstrap=1000,
            confidence=0.95,
            num_examples=4,  # normal and abnormal test images each in residuals.png
            # Reconstruction error in a feature space as well as in pixels: "" = pixels only;
            # "cxr:<classifier workdir>" (launch.train_classifier) or any cxrjax.features spec.
            # Feature score = ||phi(x) - phi(x_hat)||^2 / D (mean over the D features).
            features="",
            # The score the top-level val/test/threshold report: "" = "features" when
            # `features` is set, else "pixels". Both spaces are always in results["scores"].
            primary="",
        )
    )
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "pneumonia_mnist"
    config = base_config()
    config.preset = preset
    if preset == "tiny":
        config.encoder.update(base_features=4, max_features=8)
        # No periodic saves (each costs about a second on fake devices): the end save only.
        config.train.update(global_batch_size=8, num_steps=6, log_every=2, checkpoint_every=0)
        config.ddpm.update(t_star=20, steps=2)
        config.eval.update(batch_size=64, bootstrap=50, num_examples=2)
    elif preset == "pneumonia_mnist":
        config.generator_workdir = "workdirs/pggan_pneumonia_mnist"
        # Measured through this driver on the shared 2-core CPU (load 6-7, 1 device, full XLA
        # optimisation), Demo32 G/D at 32 px, batch 16: 0.43-0.98 s per encoder step (load
        # dependent); a whole 30-step command took 67 s, i.e. ~55 s of imports, restore,
        # compile (~10 s), scoring 738 val + test images (0.03 s each), 1000 bootstrap
        # resamples and figures. 200 steps: ~1.5-3.5 min of steps + ~1 min ~ 2.5-4.5 min.
        config.train.update(global_batch_size=16, num_steps=200, log_every=25, checkpoint_every=100)
    elif preset == "pneumonia_mnist_ddpm":
        config.method = "ddpm"
        config.generator_workdir = "workdirs/ddpm_pneumonia_mnist"
        # t* chosen on validation (4 val passes + 1 test pass instead of 1 + 1).
        config.ddpm.t_star_grid = (100, 200, 300, 500)
    else:
        raise ValueError(
            f"unknown anomaly preset {preset!r}; choose tiny, pneumonia_mnist or "
            "pneumonia_mnist_ddpm"
        )
    return config
