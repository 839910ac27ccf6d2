r"""Judges synthetic images against real ones in a feature space: FID, KID, PRDC, cluster scores,
class structure, k-means agreement, memorisation; overall and per class.

  python -m launch.evaluate_synthetic --real=pneumonia_mnist:test --synthetic=/tmp/synth_ddpm \
      --features=cxr:/tmp/cls --output=/tmp/quality [--real_train=pneumonia_mnist:train]

--real       DATASET:SPLIT of real images (a prepared or shipped dataset, multi-class labels).
--synthetic  a folder written by launch.synthesize (<class>/*.png + provenance.json), or
             DATASET:SPLIT (e.g. a prepared image_folder). Classes are matched to the real
             set's by name; images are resized to the real resolution when they differ.
--real_train DATASET:SPLIT of the generator's training images, for the memorisation check
             (default: the real dataset's train split; "none" skips it).
--features   pixels[:N] | cxr:<classifier workdir> | inception:<pytorch-fid weights .pth>.

Writes to --output: metrics.json, report.md, embedding_<pca|tsne>.png, samples_<class>.png
(real vs synthetic) and nearest_pairs.png (closest synthetic / training pairs). Features are
cached under --cache_dir, keyed by extractor, checkpoint and image content.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from cxrjax import features, quality
from cxrjax.config import ConfigError
from launch import common

REAL = flags.DEFINE_string("real", None, "Real images: DATASET:SPLIT.")
SYNTHETIC = flags.DEFINE_string(
    "synthetic", None, "Synthetic images: folder PATH or DATASET:SPLIT."
)
REAL_TRAIN = flags.DEFINE_string(
    "real_train", None, 'Training images for memorisation (default: DATASET:train; "none": skip).'
)
FEATURES = flags.DEFINE_string("features", "pixels", f"Feature extractor: {features.SPEC_HELP}.")
OUTPUT = flags.DEFINE_string("output", None, "Output directory.")
DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared datasets (default: the usual).")
CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, 'Feature cache (default: $CXRJAX_FEATURE_CACHE or ~/.cache/...; "" = off).'
)
BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per feature batch (all devices).")
SEED = flags.DEFINE_integer("seed", 0, "Seed for KID subsets, k-means and figure sampling.")
K = flags.DEFINE_integer("k", 5, "Neighbours for precision/recall/density/coverage balls.")
KID_SUBSET_SIZE = flags.DEFINE_integer("kid_subset_size", 1000, "KID subset size.")
KID_SUBSETS = flags.DEFINE_integer("kid_subsets", 100, "KID subsets.")
QUANTILE = flags.DEFINE_float(
    "memorisation_quantile", 0.01, "Near-copy threshold: this quantile of train-train NN distances."
)
EMBEDDING = flags.DEFINE_enum("embedding", "pca", list(quality.EMBEDDINGS), "2-D embedding plot.")
flags.mark_flags_as_required(["real", "synthetic", "output"])


def train_spec() -> str | None:
    if REAL_TRAIN.value is not None:
        return None if REAL_TRAIN.value.lower() == "none" else REAL_TRAIN.value
    name, _ = quality.parse_dataset_split(REAL.value)
    return f"{name}:train"


def check_arguments() -> None:
    """Everything that can be wrong with the flags, before any data is read or compiled."""
    features.check_spec(FEATURES.value)
    quality.parse_dataset_split(REAL.value)
    synthetic = os.path.expanduser(SYNTHETIC.value)
    if not os.path.isdir(synthetic):
        if ":" not in SYNTHETIC.value:
            raise FileNotFoundError(
                f"--synthetic: {synthetic} is neither a folder nor DATASET:SPLIT"
            )
        quality.parse_dataset_split(SYNTHETIC.value)
    spec = train_spec()
    if spec is not None:
        quality.parse_dataset_split(spec)
    for name, value in (("k", K.value), ("kid_subsets", KID_SUBSETS.value)):
        if value < 1:
            raise ConfigError(f"--{name} must be positive, got {value}")
    if KID_SUBSET_SIZE.value < 2 or BATCH_SIZE.value < 1:
        raise ConfigError("--kid_subset_size must be >= 2 and --batch_size >= 1")
    if not 0.0 <= QUANTILE.value <= 1.0:
        raise ConfigError(f"--memorisation_quantile must be in [0, 1], got {QUANTILE.value}")


def job():
    check_arguments()
    extractor = features.make_extractor(FEATURES.value)
    real = quality.load_image_set(REAL.value, data_dir=DATA_DIR.value)
    synthetic = quality.load_image_set(
        SYNTHETIC.value,
        data_dir=DATA_DIR.value,
        class_names=real.class_names,
        resolution=real.resolution,
    )
    spec = train_spec()
    train = None
    if spec is not None:
        train = quality.load_image_set(
            spec, data_dir=DATA_DIR.value, class_names=real.class_names, resolution=real.resolution
        )
    cache_dir = features.default_cache_dir() if CACHE_DIR.value is None else CACHE_DIR.value
    metrics = quality.evaluate(
        real.images,
        real.labels,
        synthetic.images,
        synthetic.labels,
        None if train is None else train.images,
        extractor,
        class_names=real.class_names,
        data_ids={
            "real": real.name,
            "synthetic": synthetic.name,
            **({"train": train.name} if train is not None else {}),
        },
        cache_dir=cache_dir or None,
        batch_size=BATCH_SIZE.value,
        seed=SEED.value,
        output_dir=OUTPUT.value,
        embedding=EMBEDDING.value,
        k=K.value,
        kid_subset_size=KID_SUBSET_SIZE.value,
        kid_subsets=KID_SUBSETS.value,
        memorisation_quantile=QUANTILE.value,
        extra={"synthetic_provenance": synthetic.info.get("provenance")},
    )
    return metrics


def main(argv):
    del argv
    common.setup()
    common.run_job(
        job,
        summarize,
        validate=check_arguments,
    )


def summarize(metrics) -> dict:
    """The one-line summary; small-sample caveats go to the console too (stderr, each with
    "caveat:"), not only to metrics.json and report.md, and into the summary."""
    for message in metrics.get("warnings") or []:
        print(f"caveat: {message}", file=sys.stderr, flush=True)
    return {
        "output": os.path.abspath(os.path.expanduser(OUTPUT.value)),
        **{key: metrics.get(key) for key in quality.DIRECTIONS},
        "warnings": len(metrics.get("warnings") or []),
    }


if __name__ == "__main__":
    common.main_entry(main)
