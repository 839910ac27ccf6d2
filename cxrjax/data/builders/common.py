"""Shared machinery for the cxrjax TFDS builders.

Every builder stores the same record (`image` grayscale PNG bytes at the config's resolution,
`label`, `id`, plus dataset-specific fields), validates its label files against the images
before encoding anything (so a mismatch fails in seconds, not after an hour), and streams:
generators hold only file names and labels, and images are decoded, resized and encoded a
bounded window at a time by a thread pool (PIL releases the GIL while it works).

Features avoid `tfds.features.Image`, whose encoder needs TensorFlow; images are stored as
PNG bytes in an object `Tensor` and decoded by the pipeline with `imageio.decode_gray`.
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import dataclasses
import hashlib
import inspect
import os
import pathlib
import re
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from cxrjax.data import imageio, sources

VERSION = "1.0.0"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", *imageio.DICOM_EXTENSIONS)
# Per-file decode decisions (bit depth, window, inversion), one line per image, next to the data.
DECODE_LOG = "decode_log.tsv"
SPLITS = ("train", "validation", "test")
NO_FINDING = "No Finding"  # Multi-label counts: images with no positive label.
# Decode/resize/encode threads and the most images in flight: bounds memory at about
# WINDOW full-size decoded images (NIH: 1024x1024 uint8 = 1 MiB each).
WORKERS = max(1, min(8, os.cpu_count() or 1))
WINDOW = 4 * WORKERS


class DatasetError(Exception):
    """Data that is missing, laid out wrongly, unreadable or disagrees with its label files.

    The message says what was expected (layout, publisher) or names the first offending file.
    """


class Config(tfds.core.BuilderConfig):
    """A builder config: the stored resolution; subclasses add their options.

    The config name encodes every option that changes the stored data, so each combination
    gets its own directory under `data_dir/<dataset>/<config>/<version>`.
    """

    def __init__(self, *, name: str, resolution: int, description: str = "", **kwargs):
        super().__init__(name=name, version=VERSION, description=description, **kwargs)
        self.resolution = resolution


@dataclasses.dataclass(frozen=True)
class Example:
    """One example before its image is encoded: what a generator holds per image.

    `source` is a file path or a uint8 array [H, W] / [H, W, 1]; `name` identifies it in error
    messages and in the skipped-file list (a path relative to manual_dir, or split/index).
    """

    key: str
    source: pathlib.Path | np.ndarray
    name: str
    features: dict[str, Any]


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the cxrjax builders: record features, metadata, streaming generation.

    Builders skip TFDS's global registry (TFDS ships its own `pneumonia_mnist`, which needs
    TensorFlow); `cxrjax.data.builders` keeps the name -> class registry instead.

    Subclasses set the class attributes below and implement `class_names()`,
    `_extra_features()` and `_split_examples(dl_manager) -> {split: iterable of Example}`.
    """

    VERSION = tfds.core.Version(VERSION)
    LAYOUT = ""  # Expected manual_dir layout, shown in every layout error.
    PUBLISHED: tuple[str, ...] = ()  # Where the data can be downloaded.
    HOMEPAGE = ""
    CITATION = ""
    DESCRIPTION = ""
    SPLIT_METHOD = ""  # How train/validation/test are formed; stored in the metadata.
    LABEL_KIND = sources.MULTICLASS
    DEFAULT_RESOLUTION = 128
    # The one option (besides resolution) encoded in the config name, its allowed values
    # (None: free text) and its default (the first value): e.g. "3class_r128".
    NAME_OPTION: str | None = None
    CHOICES: tuple[str, ...] | None = None
    CONFIG_CLASS = Config

    def __init__(
        self, *, manual_dir: str | os.PathLike | None = None, skip_corrupt: bool = False, **kwargs
    ):
        # Set before super().__init__, which builds `info` through `_info()`.
        self._manual_dir = pathlib.Path(manual_dir).expanduser() if manual_dir else None
        self._skip_corrupt = skip_corrupt
        self._skipped: list[str] = []
        self._class_counts: dict[str, dict[str, int]] = {}
        self._decisions: list[tuple[str, str, str]] = []  # (split, file, decode decision)
        super().__init__(**kwargs)

    @classmethod
    def manual_instructions(cls) -> str:
        where = "\n".join(f"  {url}" for url in cls.PUBLISHED)
        return f"Expected layout:\n{cls.LAYOUT}\nThe data is published at:\n{where}"

    @classmethod
    def layout_error(cls, detail: str) -> DatasetError:
        """A DatasetError for missing or misplaced data, with the layout and the publisher."""
        return DatasetError(f"{cls.name}: {detail}\n\n{cls.manual_instructions()}")

    def __init_subclass__(cls, **kwargs):
        # Subclasses stay out of TFDS's registry too (the flag is not inherited).
        super().__init_subclass__(skip_registration=True, **kwargs)
        # TFDS's own `code_path` lookup needs the `importlib_resources` backport for packages
        # outside tensorflow_datasets; the module file is what it would find.
        cls.code_path = tfds.core.Path(inspect.getfile(cls))
        if cls.LAYOUT:  # TFDS shows this text in its own manual-download errors.
            cls.MANUAL_DOWNLOAD_INSTRUCTIONS = cls.manual_instructions()

    # --- Configs by name -----------------------------------------------------------------

    @classmethod
    def config_name(cls, resolution: int, option: str | None = None) -> str:
        return f"{option}_r{resolution}" if cls.NAME_OPTION else f"r{resolution}"

    @classmethod
    def parse_config_name(cls, config_name: str) -> dict[str, Any]:
        """'3class_r128' -> {'labels': '3class', 'resolution': 128} (inverse of config_name)."""
        match = re.fullmatch(r"(?:(?P<option>.+)_)?r(?P<resolution>\d+)", config_name)
        if not match or bool(match["option"]) != bool(cls.NAME_OPTION):
            example = cls.config_name(cls.DEFAULT_RESOLUTION, cls.CHOICES and cls.CHOICES[0])
            raise DatasetError(
                f"{cls.name}: config name {config_name!r} does not look like {example!r}"
            )
        parsed: dict[str, Any] = {"resolution": int(match["resolution"])}
        if cls.NAME_OPTION:
            parsed[cls.NAME_OPTION] = match["option"]
        return parsed

    @classmethod
    def make_config(cls, resolution: int | None = None, option: str | None = None) -> Config:
        """The registered config for these options, or a custom one for other resolutions."""
        resolution = cls.DEFAULT_RESOLUTION if resolution is None else int(resolution)
        if resolution < 1:
            raise DatasetError(f"{cls.name}: resolution must be positive, got {resolution}")
        if cls.NAME_OPTION and option is None and cls.CHOICES:
            option = cls.CHOICES[0]
        if cls.NAME_OPTION and cls.CHOICES and option not in cls.CHOICES:
            raise DatasetError(
                f"{cls.name}: {cls.NAME_OPTION} must be one of {list(cls.CHOICES)}, got {option!r}"
            )
        name = cls.config_name(resolution, option)
        if name in cls.builder_configs:  # TFDS wants the very instance it registered.
            return cls.builder_configs[name]
        return cls._new_config(name, resolution, option)

    @classmethod
    def _new_config(cls, name: str, resolution: int, option: str | None) -> Config:
        kwargs = {cls.NAME_OPTION: option} if cls.NAME_OPTION else {}
        return cls.CONFIG_CLASS(
            name=name, resolution=resolution, description=f"{resolution} px (custom)", **kwargs
        )

    # --- Subclass hooks -------------------------------------------------------------------

    @abc.abstractmethod
    def class_names(self) -> tuple[str, ...]:
        """Label names in label-index order."""

    def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
        return {}

    def _static_metadata(self) -> dict[str, Any]:
        return {}

    @abc.abstractmethod
    def _split_examples(self, dl_manager) -> dict[str, Iterable[Example]]:
        """Split name -> (key, example) generator, streaming one image at a time."""

    # --- TFDS hooks -----------------------------------------------------------------------

    def _info(self) -> tfds.core.DatasetInfo:
        names = self.class_names()
        if self.LABEL_KIND == sources.MULTILABEL:
            label = tfds.features.Tensor(shape=(len(names),), dtype=np.int64)
        else:
            label = tfds.features.ClassLabel(names=list(names))
        features = tfds.features.FeaturesDict(
            {
                # PNG bytes, uint8 grayscale [resolution, resolution].
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "label": label,
                "id": tfds.features.Text(),
                **self._extra_features(),
            }
        )
        metadata = tfds.core.MetadataDict(self._build_metadata())
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=features,
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE or None,
            citation=self.CITATION or None,
            metadata=metadata,
        )

    def _build_metadata(self) -> dict[str, Any]:
        """What the code knows before generating; generation adds counts and skipped files."""
        return {
            "resolution": self.builder_config.resolution,
            "label_kind": self.LABEL_KIND,
            "class_names": list(self.class_names()),
            "split_method": self.SPLIT_METHOD,
            "published": list(self.PUBLISHED),
            **self._static_metadata(),
        }

    def _split_generators(self, dl_manager):
        # On a rebuild (overwrite) `info` holds the old build's metadata: start afresh.
        self.info.metadata.clear()
        self.info.metadata.update(self._build_metadata())
        splits = self._split_examples(dl_manager)
        return {
            split: self._generate_examples(split, examples) for split, examples in splits.items()
        }

    def _generate_examples(self, split: str, examples: Iterable[Example]):
        """Encodes images a window at a time and yields (key, record); counts classes."""
        resolution = self.builder_config.resolution
        names = self.class_names()
        counts = dict.fromkeys(names, 0)
        if self.LABEL_KIND == sources.MULTILABEL:
            counts[NO_FINDING] = 0
        num_yielded = 0
        encode_fn = lambda example: _encode(example, resolution)  # noqa: E731
        for example, encoded in bounded_map(encode_fn, examples):
            if isinstance(encoded, imageio.CorruptImageError):
                self._on_corrupt(example, encoded)
                continue
            png, decision = encoded
            self._decisions.append((split, example.name, decision))
            label = example.features["label"]
            if self.LABEL_KIND == sources.MULTILABEL:
                for name, value in zip(names, label, strict=True):
                    counts[name] += int(value)
                counts[NO_FINDING] += int(not np.any(label))
            else:
                counts[names[label]] += 1
            num_yielded += 1
            yield example.key, {"image": png, "id": example.key, **example.features}
        if num_yielded == 0:
            raise DatasetError(f"{self.name}: split {split!r} has no readable images")
        # TFDS writes the metadata after the last split, so this lands in metadata.json.
        self._class_counts[split] = counts
        self.info.metadata["class_counts"] = dict(self._class_counts)
        decisions = collections.Counter(decision for _, _, decision in self._decisions)
        self.info.metadata["decode"] = {
            "counts": dict(decisions.most_common()),
            "log": DECODE_LOG,
            "rules": "cxrjax.data.imageio module docstring",
        }
        self.info.metadata["skipped_corrupt"] = {
            "count": len(self._skipped),
            "files": list(self._skipped),
        }

    def _on_corrupt(self, example: Example, error: Exception) -> None:
        if not self._skip_corrupt:
            raise DatasetError(
                f"{self.name}: corrupt or unreadable image: {error}\n"
                "Pass skip_corrupt=True (--skip_corrupt) to skip such files; they are then "
                "logged and listed in the dataset metadata."
            ) from error
        logging.warning("%s: skipping corrupt image %s: %s", self.name, example.name, error)
        self._skipped.append(example.name)

    # --- Helpers for subclasses -----------------------------------------------------------

    @property
    def manual_dir_given(self) -> bool:
        """Whether the caller named a manual_dir (then nothing is downloaded)."""
        return self._manual_dir is not None

    def manual_dir(self) -> pathlib.Path:
        """The manual_dir (default: TFDS's `<data_dir>/downloads/manual`), or a layout error."""
        path = self._manual_dir or pathlib.Path(self.data_dir_root) / "downloads" / "manual"
        if not path.is_dir() or not any(path.iterdir()):
            raise self.layout_error(f"manual_dir {path} does not exist or is empty.")
        return path

    def check_reusable(self) -> None:
        """Raises DatasetError when already-built data no longer matches its source."""

    def write_decode_log(self) -> None:
        """Writes data_dir/decode_log.tsv (split, file, decision) after a build; no-op if none."""
        if not self._decisions:
            return
        lines = ["split\tfile\tdecision"]
        lines += ["\t".join(row) for row in self._decisions]
        path = pathlib.Path(self.data_dir) / DECODE_LOG
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def check_source(self) -> None:
        """Cheap layout checks, run before TFDS starts a build (full checks run in it)."""


def _encode(example: Example, resolution: int) -> tuple[bytes, str] | imageio.CorruptImageError:
    """File or array -> (PNG bytes at `resolution`, decode decision); returns (not raises) a
    corrupt-image error."""
    try:
        if isinstance(example.source, np.ndarray):
            pixels, decision = imageio.decode(example.source, example.name)
        else:
            try:
                data = example.source.read_bytes()
            except OSError as error:
                raise imageio.CorruptImageError(f"{example.name}: unreadable ({error})") from error
            pixels, decision = imageio.decode(data, example.name)
        if pixels.ndim != 2 or min(pixels.shape) == 0:
            raise imageio.CorruptImageError(f"{example.name}: not a 2-D image {pixels.shape}")
        return imageio.encode_png(imageio.resize_square(pixels, resolution)), decision
    except imageio.CorruptImageError as error:
        return error


def bounded_map(fn: Callable[[Any], Any], items: Iterable[Any], window: int = WINDOW) -> Iterator:
    """Yields (item, fn(item)) in input order with at most `window` items in flight."""
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= window:
                head, future = pending.popleft()
                yield head, future.result()
        while pending:
            head, future = pending.popleft()
            yield head, future.result()


def stable_hash(text: str) -> str:
    """Hex sha256: a machine- and run-independent ordering key."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def carve_groups(groups: Iterable[str], fraction: float, salt: str) -> set[str]:
    """Deterministically picks round(fraction * n) of the distinct groups (patients, files).

    Groups are ordered by sha256(salt:group) and the first ones taken: the choice depends only
    on the group names (not on file order or the machine), and adding data moves few groups.
    At least one group is taken when there are two or more, and at least one is always left.
    """
    unique = sorted(set(groups), key=lambda group: stable_hash(f"{salt}:{group}"))
    count = round(fraction * len(unique))
    if len(unique) >= 2:
        count = min(max(count, 1), len(unique) - 1)
    else:
        count = 0
    return set(unique[:count])


def is_image_file(path: pathlib.Path) -> bool:
    """An image by extension, or an extension-less DICOM file ('DICM' at byte 128)."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    if path.suffix:
        return False
    try:
        with path.open("rb") as stream:
            return imageio.is_dicom(stream.read(132))
    except OSError:
        return False


def list_images(directory: pathlib.Path, relative_to: pathlib.Path) -> list[pathlib.Path]:
    """Sorted image files directly in `directory`; other files are logged, hidden ones ignored.

    Images: IMAGE_EXTENSIONS, and DICOM files without an extension (as PACS exports name them).
    """
    images, others = [], []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        (images if is_image_file(entry) else others).append(entry)
    if others:
        logging.warning(
            "Ignoring %d non-image files in %s (e.g. %s); image files end in %s",
            len(others),
            directory,
            others[0].relative_to(relative_to),
            ", ".join(IMAGE_EXTENSIONS),
        )
    return images


# --- .npz files, read a row at a time -------------------------------------------------------


def npz_shapes(path: pathlib.Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an .npz, from the headers only."""
    try:
        with zipfile.ZipFile(path) as archive:
            result = {}
            for member in archive.namelist():
                if member.endswith(".npy"):
                    with archive.open(member) as stream:
                        shape, dtype = _read_npy_header(stream, path, member)
                    result[member[: -len(".npy")]] = (shape, dtype)
            return result
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as error:
        raise DatasetError(f"{path}: not a readable .npz file ({error})") from error


def npz_rows(path: pathlib.Path, key: str) -> Iterator[np.ndarray]:
    """Yields the rows of array `key` of an .npz one at a time (constant memory)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as stream:
            shape, dtype = _read_npy_header(stream, path, key)
            row_shape = shape[1:]
            row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
            for index in range(shape[0]):
                data = stream.read(row_bytes)
                if len(data) != row_bytes:
                    raise DatasetError(f"{path}: {key} is truncated at row {index} of {shape[0]}")
                yield np.frombuffer(data, dtype=dtype).reshape(row_shape)
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError, zlib.error) as error:
        raise DatasetError(f"{path}: cannot read {key} ({error})") from error


def _read_npy_header(stream, path, member) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    if fortran_order or dtype.hasobject:
        raise DatasetError(f"{path}: {member} must be a C-ordered numeric array")
    return tuple(shape), dtype
