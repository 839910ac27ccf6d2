"""Any folder of class-named subfolders of PNG/JPEG images: a user's data, or synthetic images.

Layouts (class folder names become the class names, sorted, unless class_names is given):
  <folder>/<class>/*.png|jpg|jpeg
  <folder>/{train,val,test}/<class>/*   (val/ may also be named validation/ or valid/)

Splits: with split folders, each is kept (val -> validation); if train/ exists without a val
folder, validation is carved from train. Without split folders, train / validation / test are
carved 80% / 10% / 10%. Carving is per class and per file: files are ordered by sha256 of
"image_folder:<path relative to the folder>"; test takes the first 10% (rounded; at least one
once a class has 3 files), validation the next 10%, train the rest.

Each folder gets its own config, named `<folder_name>_r<resolution>`; without a folder_name the
name is `folder_<sha256(absolute path)[:10]>`, so different folders never share a directory.
A `provenance.json` (JSON object; synthetic data writes generator, checkpoint step, seed) is
stored in the dataset metadata under "provenance"; its optional "class_names" list fixes the
class order (e.g. ["normal", "pneumonia"] for a folder holding only pneumonia/), so synthetic
labels line up with the real dataset's. The build records a fingerprint of the folder (file
names, sizes, modification times); preparing again after the folder changed fails unless
overwrite=True.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
from collections.abc import Sequence

from cxrjax.data.builders import common

PROVENANCE_FILE = "provenance.json"
DEFAULT_RESOLUTION = 64
TEST_FRACTION = 0.1
VAL_FRACTION = 0.1
# Split folder aliases -> split name; matched case-insensitively.
SPLIT_FOLDERS = {
    "train": "train",
    "val": "validation",
    "validation": "validation",
    "valid": "validation",
    "test": "test",
}


class ImageFolderConfig(common.Config):
    """Config: the folder, its class names and a fingerprint of its files."""

    def __init__(
        self,
        *,
        path: pathlib.Path,
        folder_name: str,
        class_names: tuple[str, ...],
        split_dirs: dict[str, pathlib.Path],
        provenance: dict | None,
        fingerprint: str,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.path = path
        self.folder_name = folder_name
        self.class_names = class_names
        self.split_dirs = split_dirs  # split -> folder holding class folders; {} means carve all.
        self.provenance = provenance
        self.fingerprint = fingerprint


class ImageFolder(common.Builder):
    """A folder of class folders (optionally under train/ val/ test/) -> records."""

    name = "image_folder"
    DEFAULT_RESOLUTION = DEFAULT_RESOLUTION
    NAME_OPTION = "folder_name"
    HOMEPAGE = ""
    PUBLISHED = ("(your own data: any folder in the layout above)",)
    LAYOUT = (
        "  <folder>/<class>/*.png|jpg|jpeg                 (splits carved 80/10/10 per class)\n"
        "  or <folder>/{train,val,test}/<class>/*.png|jpg|jpeg\n"
        "  optional <folder>/provenance.json                (stored in the dataset metadata)\n"
    )
    DESCRIPTION = __doc__
    SPLIT_METHOD = (
        "Split folders kept when present (val/validation/valid -> validation); validation carved "
        f"from train when train/ has no val folder ({VAL_FRACTION:.0%}); with no split folders "
        f"train/validation/test = {1 - VAL_FRACTION - TEST_FRACTION:.0%}/{VAL_FRACTION:.0%}/"
        f"{TEST_FRACTION:.0%}. Carving is per class and per file, ordered by "
        "sha256('image_folder:<relative path>'): test first, then validation."
    )

    @classmethod
    def make_config(
        cls,
        resolution: int | None = None,
        option: str | None = None,
        *,
        path: str | os.PathLike | None = None,
        class_names: Sequence[str] | None = None,
    ) -> ImageFolderConfig:
        """Scans `path` (layout, classes, fingerprint) and names the config after it."""
        if path is None:
            raise cls.layout_error("image_folder needs the folder: pass manual_dir (--manual_dir).")
        path = pathlib.Path(path).expanduser().resolve()
        if not path.is_dir():
            raise cls.layout_error(f"{path} is not a directory.")
        resolution = DEFAULT_RESOLUTION if resolution is None else int(resolution)
        if resolution < 1:
            raise common.DatasetError(f"{cls.name}: resolution must be positive, got {resolution}")
        folder_name = option or "folder_" + common.stable_hash(str(path))[:10]
        if not re.fullmatch(r"[A-Za-z0-9][\w\-.]*", folder_name):
            raise common.DatasetError(
                f"{cls.name}: folder_name {folder_name!r} must be letters, digits, '_', '-', '.'"
            )
        provenance = _read_provenance(path)
        split_dirs = _split_dirs(path)
        found = sorted(
            {
                entry.name
                for folder in (split_dirs.values() or [path])
                for entry in folder.iterdir()
                if entry.is_dir() and not entry.name.startswith(".")
            }
        )
        if class_names is None and provenance and provenance.get("class_names"):
            class_names = provenance["class_names"]
        names = tuple(str(name) for name in class_names) if class_names else tuple(found)
        unknown = sorted(set(found) - set(names))
        if unknown:
            raise common.DatasetError(
                f"{cls.name}: class folders {unknown} in {path} are not among class_names "
                f"{list(names)}"
            )
        if len(names) < 2:
            raise cls.layout_error(
                f"{path} has class folders {found}; a dataset needs at least two classes "
                "(pass class_names, or list them in provenance.json, when a folder holds only "
                "some)."
            )
        fingerprint = _fingerprint(path, names)
        return ImageFolderConfig(
            name=f"{folder_name}_r{resolution}",
            resolution=resolution,
            description=f"{path} at {resolution} px",
            path=path,
            folder_name=folder_name,
            class_names=names,
            split_dirs=split_dirs,
            provenance=provenance,
            fingerprint=fingerprint,
        )

    def class_names(self) -> tuple[str, ...]:
        return self.builder_config.class_names

    def _static_metadata(self):
        config = self.builder_config
        metadata = {"source_dir": str(config.path), "fingerprint": config.fingerprint}
        if config.provenance is not None:
            metadata["provenance"] = config.provenance
        return metadata

    def check_reusable(self) -> None:
        stored = self.info.metadata.get("fingerprint")
        if stored is not None and stored != self.builder_config.fingerprint:
            raise common.DatasetError(
                f"{self.name}: {self.builder_config.path} changed since it was prepared into "
                f"{self.data_dir}. Pass overwrite=True (--overwrite) to rebuild it, or another "
                "folder_name (--name) to keep both."
            )

    def _split_examples(self, dl_manager):
        config = self.builder_config
        root = config.path
        files: dict[str, list[tuple[pathlib.Path, int]]] = {}
        for split, folder in (config.split_dirs or {"all": root}).items():
            files[split] = []
            for entry in sorted(folder.iterdir()):
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    label = config.class_names.index(entry.name)
                    files[split] += [(path, label) for path in common.list_images(entry, root)]
                elif entry.suffix.lower() in common.IMAGE_EXTENSIONS:
                    raise self.layout_error(f"{entry} is not inside a class folder.")
        if not config.split_dirs:
            files = _carve(
                files.pop("all"), root, {"test": TEST_FRACTION, "validation": VAL_FRACTION}
            )
        elif "train" in files and "validation" not in files:
            carved = _carve(files.pop("train"), root, {"validation": VAL_FRACTION})
            files.update(carved)
        return {
            split: self._examples(root, files[split]) for split in common.SPLITS if files.get(split)
        }

    def _examples(self, root: pathlib.Path, files):
        for path, label in files:
            key = path.relative_to(root).as_posix()
            yield common.Example(key, path, key, {"label": label})


def _read_provenance(path: pathlib.Path) -> dict | None:
    provenance_path = path / PROVENANCE_FILE
    if not provenance_path.is_file():
        return None
    try:
        provenance = json.loads(provenance_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise common.DatasetError(f"{provenance_path}: not readable JSON ({error})") from error
    if not isinstance(provenance, dict):
        raise common.DatasetError(f"{provenance_path}: must hold a JSON object")
    return provenance


def _split_dirs(path: pathlib.Path) -> dict[str, pathlib.Path]:
    """Split -> folder when `path` uses train/ val/ test/ folders, else {}."""
    splits: dict[str, pathlib.Path] = {}
    others = []
    for entry in sorted(path.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        split = SPLIT_FOLDERS.get(entry.name.lower())
        if split is None:
            others.append(entry.name)
        elif split in splits:
            raise common.DatasetError(f"{path}: both {splits[split].name}/ and {entry.name}/ exist")
        else:
            splits[split] = entry
    if splits and others:
        raise ImageFolder.layout_error(
            f"{path} mixes split folders {sorted(p.name for p in splits.values())} with other "
            f"folders {others}."
        )
    return splits


def _carve(files, root: pathlib.Path, fractions: dict[str, float]) -> dict[str, list]:
    """Per class: order files by hash, give each split its fraction in turn, the rest to train."""
    result: dict[str, list] = {split: [] for split in fractions}
    result["train"] = []
    for label in sorted({label for _, label in files}):
        members = sorted(
            (item for item in files if item[1] == label),
            key=lambda item: common.stable_hash(
                "image_folder:" + item[0].relative_to(root).as_posix()
            ),
        )
        start = 0
        for split, fraction in fractions.items():
            count = round(fraction * len(members))
            if len(members) >= 3:
                count = max(count, 1)
            result[split] += members[start : start + count]
            start += count
        result["train"] += members[start:]
    return result


def _fingerprint(path: pathlib.Path, class_names: tuple[str, ...]) -> str:
    """sha256 over every file's relative path, size and mtime, and the class names."""
    digest = hashlib.sha256(json.dumps(list(class_names)).encode())
    for directory, subdirs, names in os.walk(path):
        subdirs.sort()
        for name in sorted(names):
            stat = os.stat(os.path.join(directory, name))
            relative = os.path.relpath(os.path.join(directory, name), path)
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
