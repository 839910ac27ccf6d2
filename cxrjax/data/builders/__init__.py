"""TFDS dataset builders for chest X-rays, and the one way the project prepares and loads them.

Datasets (records: `image` grayscale PNG bytes at the config's resolution, `label`, `id`,
plus per-dataset fields; see each module's docstring for layout, labels and splits):

  pneumonia_mnist     shipped 28 px subset (default, offline) or the official MedMNIST files
  kermany_pneumonia   Kermany/Kaggle chest_xray/ folders; binary or 3class labels
  nih_chest_xray14    NIH ChestX-ray14 PNGs + Data_Entry_2017.csv; 14-finding multi-hot
  image_folder        class folders or a label CSV (DICOM/PNG/JPEG/TIFF; patient-level splits)

Names: a dataset is named `<dataset>` with options as arguments, or `<dataset>/<config>` with
the options in the config name, which is also its directory under data_dir:

  pneumonia_mnist/{subset,medmnist}_r<N>    variant=...,     default subset_r28
  kermany_pneumonia/{binary,3class}_r<N>    labels=...,      default binary_r128
  nih_chest_xray14/r<N>                                      default r128
  image_folder/<folder_name>_r<N>           folder_name=..., default folder_<hash of path>_r64

Any positive resolution works (other than the registered ones it is a custom config).
Data lives in `data_dir` (default: $CXRJAX_DATA_DIR, else ~/cxrjax_datasets), as array_record
files readable without TensorFlow. `prepare` is idempotent: a second call reuses the data.

  builder = builders.prepare("kermany_pneumonia", manual_dir="~/data", labels="3class")
  source, spec = builders.load("kermany_pneumonia/3class_r128", "train", manual_dir="~/data")
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from cxrjax.data import sources
from cxrjax.data.builders import common, image_folder, kermany_pneumonia, nih_chest_xray14
from cxrjax.data.builders import pneumonia_mnist as pneumonia_mnist_lib
from cxrjax.data.builders.common import DatasetError

DATA_DIR_ENV = "CXRJAX_DATA_DIR"
FILE_FORMAT = "array_record"
BUILDERS: dict[str, type[common.Builder]] = {
    "pneumonia_mnist": pneumonia_mnist_lib.PneumoniaMnist,
    "kermany_pneumonia": kermany_pneumonia.KermanyPneumonia,
    "nih_chest_xray14": nih_chest_xray14.NihChestXray14,
    "image_folder": image_folder.ImageFolder,
}
# Accepted split names; TFDS stores "validation".
_SPLIT_ALIASES = {"val": "validation", "valid": "validation"}


def canonical_split(split: str) -> str:
    """The split a name stands for: "val" and "valid" are "validation"."""
    return _SPLIT_ALIASES.get(split, split)


__all__ = [
    "BUILDERS",
    "DatasetError",
    "class_counts",
    "default_data_dir",
    "load",
    "make_builder",
    "prepare",
    "spec",
]


def default_data_dir() -> pathlib.Path:
    """$CXRJAX_DATA_DIR, else ~/cxrjax_datasets (kept apart from TFDS's own datasets)."""
    return pathlib.Path(os.environ.get(DATA_DIR_ENV) or "~/cxrjax_datasets").expanduser()


def make_builder(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    resolution: int | None = None,
    variant: str | None = None,
    labels: str | None = None,
    folder_name: str | None = None,
    class_names: Sequence[str] | None = None,
    skip_corrupt: bool = False,
    labels_csv: str | os.PathLike | None = None,
    patient_pattern: str | None = None,
    strict_patients: bool = False,
) -> tfds.core.DatasetBuilder:
    """The builder for `name` and options, without building anything.

    `variant` is for pneumonia_mnist, `labels` for kermany_pneumonia, `folder_name` and
    `class_names`, `labels_csv`, `patient_pattern` and `strict_patients` for image_folder (whose
    folder is `manual_dir`; see its module docstring); giving an option to a
    dataset that has no such option, or one that contradicts the config name, is an error;
    None and "" both mean "not set".
    An already prepared image_folder config is found by name without its folder.
    """
    # Empty strings mean "not set", as ConfigDict fields spell it.
    data_dir, manual_dir = data_dir or None, manual_dir or None
    variant, labels, folder_name = variant or None, labels or None, folder_name or None
    class_names = class_names or None
    dataset, _, config_name = name.partition("/")
    if dataset not in BUILDERS:
        raise DatasetError(f"unknown dataset {dataset!r}; known: {sorted(BUILDERS)}")
    cls = BUILDERS[dataset]
    given = {"variant": variant, "labels": labels, "folder_name": folder_name}
    for option, value in given.items():
        if value is not None and option != cls.NAME_OPTION:
            raise DatasetError(f"{dataset} has no option {option!r}")
    folder_options = {
        "class_names": class_names,
        "labels_csv": labels_csv or None,
        "patient_pattern": patient_pattern or None,
        "strict_patients": strict_patients or None,
    }
    for option, value in folder_options.items():
        if value is not None and cls is not image_folder.ImageFolder:
            raise DatasetError(f"{dataset} has no option {option!r}")
    option = given.get(cls.NAME_OPTION) if cls.NAME_OPTION else None
    if config_name:
        parsed = cls.parse_config_name(config_name)
        for key, value in (("resolution", resolution), (cls.NAME_OPTION, option)):
            if value is not None and key is not None and str(value) != str(parsed[key]):
                raise DatasetError(f"{name}: {key}={value!r} contradicts the config name")
        resolution, option = parsed["resolution"], parsed.get(cls.NAME_OPTION)

    data_dir = pathlib.Path(data_dir).expanduser() if data_dir else default_data_dir()
    kwargs = {"data_dir": os.fspath(data_dir), "file_format": FILE_FORMAT}
    if cls is image_folder.ImageFolder:
        if manual_dir is None:
            return _prepared_image_folder(data_dir, resolution, option)
        config = cls.make_config(
            resolution,
            option,
            path=manual_dir,
            class_names=class_names,
            labels_csv=labels_csv or None,
            patient_pattern=patient_pattern or None,
            strict_patients=bool(strict_patients),
        )
        return cls(config=config, skip_corrupt=skip_corrupt, **kwargs)
    config = cls.make_config(resolution, option)
    return cls(config=config, manual_dir=manual_dir, skip_corrupt=skip_corrupt, **kwargs)


def prepare(name: str, *, overwrite: bool = False, **options) -> tfds.core.DatasetBuilder:
    """Builds the dataset unless already built, and returns its builder (see `make_builder`).

    skip_corrupt=True skips unreadable images (each logged, all listed in the metadata under
    "skipped_corrupt"); otherwise the first one fails the build, named. overwrite=True
    rebuilds from scratch. Raises DatasetError with the expected layout for bad input.

    In a multi-process run process 0 builds first while the others wait at a barrier, then
    they open what it wrote (or, on a host without a shared data_dir, build their own copy):
    several processes writing one dataset directory at once would collide.
    """
    import jax

    if jax.process_count() == 1:
        return _prepare(name, overwrite=overwrite, **options)
    from cxrjax import parallel

    builder = _prepare(name, overwrite=overwrite, **options) if jax.process_index() == 0 else None
    parallel.sync(f"cxrjax-prepare-{name}")
    return builder or _prepare(name, overwrite=False, **options)


def _prepare(name: str, *, overwrite: bool, **options) -> tfds.core.DatasetBuilder:
    builder = make_builder(name, **options)
    if not isinstance(builder, common.Builder):  # A prepared image_folder, read back.
        if overwrite:
            raise DatasetError(f"{name}: rebuilding needs the source folder as manual_dir")
        return builder
    if not overwrite:
        builder.check_reusable()
    if overwrite or not (pathlib.Path(builder.data_dir) / "dataset_info.json").is_file():
        builder.check_source()
    mode = tfds.download.GenerateMode
    download_config = tfds.download.DownloadConfig(
        # GCS lookups would reach the network; these datasets are never hosted there.
        try_download_gcs=False,
        download_mode=mode.REUSE_CACHE_IF_EXISTS if overwrite else mode.REUSE_DATASET_IF_EXISTS,
    )
    builder.download_and_prepare(download_config=download_config)
    builder.write_decode_log()
    return builder


def load(name: str, split: str, **options) -> tuple[Any, sources.DatasetSpec]:
    """(random-access source of one split, DatasetSpec); prepares the dataset if needed.

    `split` is train, validation (or val) or test; options as for `prepare`.
    """
    builder = prepare(name, **options)
    split = _SPLIT_ALIASES.get(split, split)
    if split not in builder.info.splits:
        raise DatasetError(f"{name}: no split {split!r}; it has {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split), spec(builder)


def spec(builder: tfds.core.DatasetBuilder) -> sources.DatasetSpec:
    """The DatasetSpec (name with config, classes, label kind, resolution) of a builder."""
    metadata = builder.info.metadata
    return sources.DatasetSpec(
        name=f"{builder.name}/{builder.info.config_name}",
        class_names=tuple(metadata["class_names"]),
        label_kind=metadata["label_kind"],
        resolution=int(metadata["resolution"]),
    )


def class_counts(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, int]:
    """Images per class (multi-label: per finding, plus "No Finding") in a prepared split."""
    split = _SPLIT_ALIASES.get(split, split)
    counts = builder.info.metadata.get("class_counts", {})
    if split not in counts:
        raise DatasetError(f"{builder.name}: no class counts for split {split!r}; is it prepared?")
    return dict(counts[split])


def _prepared_image_folder(data_dir: pathlib.Path, resolution, folder_name):
    """An image_folder config built earlier, read back without its source folder."""
    cls = image_folder.ImageFolder
    if folder_name is None:
        raise DatasetError(
            "image_folder needs its folder (manual_dir), or the folder_name of a prepared one"
        )
    resolution = cls.DEFAULT_RESOLUTION if resolution is None else int(resolution)
    config_dir = data_dir / cls.name / cls.config_name(resolution, folder_name) / common.VERSION
    if not (config_dir / "dataset_info.json").is_file():
        raise cls.layout_error(
            f"image_folder {folder_name!r} at {resolution} px is not prepared in {data_dir}; "
            "pass its folder as manual_dir."
        )
    return tfds.builder_from_directory(os.fspath(config_dir))
