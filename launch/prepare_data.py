"""Builds a dataset into data_dir (idempotent) and prints its images per split and per class.

  python -m launch.prepare_data --dataset=pneumonia_mnist                     # shipped, offline
  python -m launch.prepare_data --dataset=pneumonia_mnist --variant=medmnist --resolution=64 \
      --manual_dir=~/medmnist
  python -m launch.prepare_data --dataset=kermany_pneumonia --manual_dir=~/kermany --labels=3class
  python -m launch.prepare_data --dataset=nih_chest_xray14 --manual_dir=~/nih --resolution=256
  python -m launch.prepare_data --dataset=image_folder --manual_dir=out/synth --name=ddpm_s0 \
      --resolution=32 --class_names=normal,pneumonia
  python -m launch.prepare_data --dataset=image_folder --manual_dir=~/hospital_export \
      --labels_csv=~/hospital_export/labels.csv --patient_pattern='^(\\d+)_' --strict_patients

--dataset also takes a config name (kermany_pneumonia/3class_r64). Bad input (missing data, wrong
layout, corrupt image, label files that disagree with the images) prints the reason, the expected
layout and where the data is published to stderr, and exits 2 (no traceback). Split folders
that share patients print a warning (count and examples; kept in the metadata), an error with
--strict_patients.
"""

from __future__ import annotations

import sys

from absl import app, flags

from cxrjax.data import builders, sources

_DATASET = flags.DEFINE_string(
    "dataset", None, f"One of {sorted(builders.BUILDERS)}, optionally /<config>.", required=True
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Default: $CXRJAX_DATA_DIR or ~/cxrjax_datasets.")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "Downloaded source data (image_folder: the folder itself)."
)
_RESOLUTION = flags.DEFINE_integer("resolution", None, "Stored image size in pixels.")
_VARIANT = flags.DEFINE_enum("variant", None, ["subset", "medmnist"], "pneumonia_mnist files.")
_LABELS = flags.DEFINE_enum("labels", None, ["binary", "3class"], "kermany_pneumonia labels.")
_NAME = flags.DEFINE_string("name", None, "image_folder: config name (default: hash of the path).")
_CLASS_NAMES = flags.DEFINE_list(
    "class_names", None, "image_folder: class order (default: sorted)."
)
_LABELS_CSV = flags.DEFINE_string(
    "labels_csv",
    None,
    "image_folder: CSV of path,label or path,<finding columns> [,patient_id][,split] "
    "(default: <manual_dir>/labels.csv when present).",
)
_PATIENT_PATTERN = flags.DEFINE_string(
    "patient_pattern",
    None,
    "image_folder: regex whose 'patient' group (else group 1) in a file name is the patient id "
    "(default: NIH's <8-digit patient>_<3-digit>.png when every name matches).",
)
_STRICT_PATIENTS = flags.DEFINE_bool(
    "strict_patients", False, "image_folder: patients shared by given splits are an error."
)
_SKIP_CORRUPT = flags.DEFINE_bool(
    "skip_corrupt", False, "Skip unreadable images (logged, listed in the metadata)."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild even if already prepared.")
_SHOW_BATCHES = flags.DEFINE_integer(
    "show_batches", 2, "Print statistics of this many augmented training batches (0: none)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size for --show_batches.")


def summary(builder) -> str:
    """Images per split and per class (multi-label: per finding), from the build's metadata."""
    spec = builders.spec(builder)
    lines = [
        f"{spec.name}: {spec.num_classes} classes ({spec.label_kind}), {spec.resolution} px, "
        f"in {builder.data_dir}"
    ]
    for split in builder.info.splits:
        num_images = builder.info.splits[split].num_examples
        lines.append(f"  {split}: {num_images} images")
        counts = builders.class_counts(builder, split)
        width = max(len(name) for name in counts)
        lines += [f"    {name:<{width}}  {count}" for name, count in counts.items()]
        if spec.label_kind == sources.MULTICLASS and sum(counts.values()) != num_images:
            raise builders.DatasetError(
                f"{spec.name}/{split}: class counts do not sum to {num_images}"
            )
    skipped = builder.info.metadata.get("skipped_corrupt", {})
    lines.append(f"  skipped corrupt images: {skipped.get('count', 0)}")
    lines += [f"    {name}" for name in skipped.get("files", [])]
    lines.append(f"  splits: {builder.info.metadata.get('split_method', '')}")
    metadata = builder.info.metadata
    if "patient_ids" in metadata:
        lines.append(f"  patient ids: {metadata['patient_ids']}")
        overlap = metadata.get("patient_overlap") or {}
        lines.append(f"  patients in more than one split: {overlap.get('count', 0)}")
        lines += [f"    {example}" for example in overlap.get("examples", [])]
    decode = metadata.get("decode", {}).get("counts", {})
    if decode:
        lines.append(f"  decoding (per file in {metadata['decode'].get('log')}):")
        lines += [f"    {count}  {decision}" for decision, count in decode.items()]
    if "provenance" in builder.info.metadata:
        lines.append(f"  provenance: {builder.info.metadata['provenance']}")
    return "\n".join(lines)


def batch_statistics(builder, num_batches: int, batch_size: int) -> str:
    """Real training batches through the Grain pipeline (augmented, [-1, 1]), summarised."""
    import json

    from cxrjax.data import pipeline

    spec = builders.spec(builder)
    source = builder.as_data_source(split="train")
    iterator = pipeline.make_train_iterator(
        source,
        spec,
        global_batch_size=batch_size,
        seed=0,
        process_index=0,
        process_count=1,
        device_count=1,
    )
    stats = pipeline.describe_batches(iterator, num_batches, spec)
    lines = ["train batches (seed 0, augmented, generator range [-1, 1]):"]
    lines += [f"  {key}: {json.dumps(value)}" for key, value in stats.items()]
    return "\n".join(lines)


def _folder_options() -> dict:
    """image_folder-only flags, passed only when set (other datasets reject them)."""
    options = {
        "labels_csv": _LABELS_CSV.value,
        "patient_pattern": _PATIENT_PATTERN.value,
        "strict_patients": _STRICT_PATIENTS.value,
    }
    return {key: value for key, value in options.items() if value}


def main(argv):
    del argv
    try:
        builder = builders.prepare(
            _DATASET.value,
            data_dir=_DATA_DIR.value,
            manual_dir=_MANUAL_DIR.value,
            resolution=_RESOLUTION.value,
            variant=_VARIANT.value,
            labels=_LABELS.value,
            folder_name=_NAME.value,
            class_names=_CLASS_NAMES.value,
            skip_corrupt=_SKIP_CORRUPT.value,
            overwrite=_OVERWRITE.value,
            **_folder_options(),
        )
        print(summary(builder))
        if _SHOW_BATCHES.value:
            print(batch_statistics(builder, _SHOW_BATCHES.value, _BATCH_SIZE.value))
    except builders.DatasetError as error:
        print(f"prepare_data: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
