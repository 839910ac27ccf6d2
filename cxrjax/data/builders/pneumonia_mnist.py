"""PneumoniaMNIST: pediatric chest X-rays, normal vs pneumonia (MedMNIST v2).

Two variants:
  subset    (default, offline) the class-balanced 28x28 subset shipped in
            `cxrjax/data/resources/pneumoniamnist_subset_28.npz` (2428 / 270 / 468 images).
  medmnist  the official MedMNIST files (4708 / 524 / 624 images) `pneumoniamnist.npz` (28 px),
            `pneumoniamnist_{64,128,224}.npz`, read from manual_dir, or downloaded from Zenodo
            with the TFDS download manager when no manual_dir is given.

Both keep the files' own train/val/test split. A resolution other than a file's native size
is resized from the closest file at or above it (else the largest) with `imageio.resize_square`.
"""

from __future__ import annotations

import importlib.resources
import pathlib

import numpy as np

from cxrjax.data.builders import common

SUBSET = "subset"
MEDMNIST = "medmnist"
SUBSET_FILE = "pneumoniamnist_subset_28.npz"
ZENODO_RECORD = "https://zenodo.org/records/10519652"
# Official file name per native resolution.
MEDMNIST_FILES = {
    28: "pneumoniamnist.npz",
    64: "pneumoniamnist_64.npz",
    128: "pneumoniamnist_128.npz",
    224: "pneumoniamnist_224.npz",
}
_NPZ_SPLITS = {"train": "train", "validation": "val", "test": "test"}


class PneumoniaMnistConfig(common.Config):
    """Config: resolution plus which files to read (`subset` or `medmnist`)."""

    def __init__(self, *, variant: str, **kwargs):
        super().__init__(**kwargs)
        self.variant = variant


def _config(variant: str, resolution: int, note: str) -> PneumoniaMnistConfig:
    return PneumoniaMnistConfig(
        name=f"{variant}_r{resolution}", resolution=resolution, variant=variant, description=note
    )


class PneumoniaMnist(common.Builder):
    """PneumoniaMNIST at 28 px (shipped subset) or from the official MedMNIST files."""

    name = "pneumonia_mnist"
    BUILDER_CONFIGS = [
        _config(SUBSET, 28, "Shipped subset, native 28 px."),
        _config(SUBSET, 32, "Shipped subset upsampled to 32 px (generator resolution)."),
        _config(SUBSET, 64, "Shipped subset upsampled to 64 px."),
        *[
            _config(MEDMNIST, size, f"Official MedMNIST file {file}, native {size} px.")
            for size, file in MEDMNIST_FILES.items()
        ],
    ]
    DEFAULT_CONFIG_NAME = "subset_r28"
    DEFAULT_RESOLUTION = 28
    NAME_OPTION = "variant"
    CHOICES = (SUBSET, MEDMNIST)
    CONFIG_CLASS = PneumoniaMnistConfig
    HOMEPAGE = "https://medmnist.com/"
    PUBLISHED = (f"{ZENODO_RECORD} (MedMNIST v2 files; the {MEDMNIST} variant)",)
    LAYOUT = (
        "  <manual_dir>/pneumoniamnist.npz        (28 px)\n"
        "  <manual_dir>/pneumoniamnist_64.npz     (64 px)\n"
        "  <manual_dir>/pneumoniamnist_128.npz    (128 px)\n"
        "  <manual_dir>/pneumoniamnist_224.npz    (224 px)\n"
        "  each with train_images [N, S, S] uint8, train_labels [N, 1] (0 normal, 1 pneumonia),\n"
        "  and the same for val_ and test_; only the file for the requested resolution is needed.\n"
    )
    DESCRIPTION = __doc__
    CITATION = (
        "Jiancheng Yang et al. MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D "
        "biomedical image classification. Scientific Data, 2023.\n"
        "Daniel S. Kermany et al. Identifying Medical Diagnoses and Treatable Diseases by "
        "Image-Based Deep Learning. Cell 172(5), 2018."
    )
    SPLIT_METHOD = "The source file's own train / val / test arrays (val -> validation)."

    def class_names(self) -> tuple[str, ...]:
        return ("normal", "pneumonia")

    def _static_metadata(self):
        return {"variant": self.builder_config.variant, "source_file": self._file_name()}

    def _file_name(self) -> str:
        if self.builder_config.variant == SUBSET:
            return SUBSET_FILE
        resolution = self.builder_config.resolution
        native = [size for size in sorted(MEDMNIST_FILES) if size >= resolution]
        return MEDMNIST_FILES[native[0] if native else max(MEDMNIST_FILES)]

    def check_source(self) -> None:
        if self.builder_config.variant == MEDMNIST and self.manual_dir_given:
            if not (self._manual_dir / self._file_name()).is_file():
                raise self.layout_error(
                    f"{self._file_name()} is not in manual_dir {self._manual_dir}."
                )

    def _npz_path(self, dl_manager) -> pathlib.Path:
        file = self._file_name()
        if self.builder_config.variant == SUBSET:
            # The package is installed as files (setuptools package-data), so this is a path.
            return pathlib.Path(str(importlib.resources.files("cxrjax.data.resources") / file))
        manual = self._manual_dir or pathlib.Path(self.data_dir_root) / "downloads" / "manual"
        if (manual / file).is_file():
            return manual / file
        if self.manual_dir_given:
            raise self.layout_error(f"{file} is not in manual_dir {manual}.")
        url = f"{ZENODO_RECORD}/files/{file}?download=1"
        try:
            return pathlib.Path(dl_manager.download(url))
        except Exception as error:  # The download manager raises many types; all mean the same.
            raise self.layout_error(
                f"{file} is not in {manual} and downloading {url} failed ({error}). "
                "Download it yourself and pass its folder as manual_dir."
            ) from error

    def _split_examples(self, dl_manager):
        path = self._npz_path(dl_manager)
        shapes = common.npz_shapes(path)
        labels = {}
        # Validate every split before encoding anything: a mismatch fails in seconds.
        for split, prefix in _NPZ_SPLITS.items():
            for key in (f"{prefix}_images", f"{prefix}_labels"):
                if key not in shapes:
                    raise self.layout_error(f"{path.name} has no array {key!r}.")
            (image_shape, dtype) = shapes[f"{prefix}_images"]
            if (
                dtype != np.uint8
                or len(image_shape) not in (3, 4)
                or image_shape[3:] not in ((), (1,))
            ):
                raise common.DatasetError(
                    f"{path}: {prefix}_images must be uint8 [N, H, W] or [N, H, W, 1], "
                    f"got {dtype} {image_shape}"
                )
            with np.load(path) as arrays:  # Labels are small: N integers.
                split_labels = np.asarray(arrays[f"{prefix}_labels"]).reshape(-1)
            if len(split_labels) != image_shape[0]:
                raise common.DatasetError(
                    f"{path}: {prefix}_images has {image_shape[0]} images but {prefix}_labels has "
                    f"{len(split_labels)} labels"
                )
            bad = np.flatnonzero((split_labels != 0) & (split_labels != 1))
            if bad.size:
                raise common.DatasetError(
                    f"{path}: {prefix}_labels[{bad[0]}] = {split_labels[bad[0]]}, expected 0 "
                    "(normal) or 1 (pneumonia)"
                )
            labels[split] = split_labels.astype(np.int64)
        return {
            split: self._examples(path, prefix, labels[split])
            for split, prefix in _NPZ_SPLITS.items()
        }

    def _examples(self, path: pathlib.Path, prefix: str, labels: np.ndarray):
        rows = common.npz_rows(path, f"{prefix}_images")
        for index, (image, label) in enumerate(zip(rows, labels, strict=True)):
            key = f"{prefix}/{index:05d}"
            yield common.Example(key, image, f"{path.name}:{key}", {"label": int(label)})
