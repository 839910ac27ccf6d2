"""Random-access data sources and the record contract every pipeline relies on.

A source is any object with `__len__` and `__getitem__(index) -> record` (what Grain's
`MapDataset.source` accepts; `tfds.data_source` splits qualify). A record is a dict:

  image: PNG/JPEG bytes, or a uint8 array [H, W] / [H, W, 1] (grayscale)
  label: int (multi-class) or a 0/1 vector [num_classes] (multi-label)
  id:    str or bytes, unique within the dataset (file name, NIH image index, ...)

Decoding happens in the pipeline (`transforms.DecodeImage`), so a corrupt record is found,
named and counted there, on every path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

MULTICLASS = "multiclass"
MULTILABEL = "multilabel"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a model and the metrics need to know about a dataset's labels."""

    name: str
    class_names: tuple[str, ...]
    label_kind: str = MULTICLASS
    resolution: int | None = None

    def __post_init__(self):
        if self.label_kind not in (MULTICLASS, MULTILABEL):
            raise ValueError(
                f"label_kind must be {MULTICLASS!r} or {MULTILABEL!r}, got {self.label_kind!r}"
            )
        if len(self.class_names) < 2 and self.label_kind == MULTICLASS:
            raise ValueError(
                f"{self.name}: a multi-class dataset needs >= 2 classes, got {self.class_names}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ArraySource:
    """In-memory source over uint8 images [N, H, W] and labels (tests, small data, synthesis)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, ids: Sequence[str] | None = None):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(
                f"images must be uint8 [N, H, W(, 1)], got {images.dtype} {images.shape}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self._images = images
        self._labels = np.asarray(labels)
        self._ids = list(ids) if ids is not None else [str(i) for i in range(len(images))]

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self._images[index], "label": self._labels[index], "id": self._ids[index]}

    def __repr__(self) -> str:
        return f"ArraySource(n={len(self)}, image_shape={self._images.shape[1:]})"
