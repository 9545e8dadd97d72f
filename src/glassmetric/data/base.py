"""The data set interface every loader implements.

A data set is a list of images with integer class labels. ``load(i)`` returns the raw
:class:`Sample` (a PIL image plus optional ground truth: part keypoints and a bounding box, in
the pixel coordinates of that image); ``__getitem__`` applies the transform and returns the
dictionary the training and evaluation loops batch together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from glassmetric.data.image_io import check_policy, skip_bad
from glassmetric.errors import DataError


@dataclass
class Sample:
    """One raw image and its ground truth.

    ``keypoints`` is a float32 array of shape (P, 3): x, y (pixels of ``image``) and a visible
    flag (1.0 visible, 0.0 not; invisible rows have x = y = 0). ``bbox`` is (x, y, w, h).
    """

    image: Image.Image
    label: int
    keypoints: np.ndarray | None = None
    bbox: tuple[float, float, float, float] | None = None
    meta: dict = field(default_factory=dict)


class RetrievalDataset(torch.utils.data.Dataset):
    """Base class: subclasses set ``self.labels`` (int64 array, one per image) and ``load``."""

    #: names of the ground-truth parts whose keypoints ``load`` returns, in order
    part_names: tuple[str, ...] = ()

    def __init__(self, transform: Callable | None = None):
        self.transform = transform
        self.labels: np.ndarray = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def classes(self) -> np.ndarray:
        """Sorted distinct class labels."""
        return np.unique(self.labels)

    #: what ``__getitem__`` does with an unreadable image: ``error`` raises a DataError naming
    #: the file, ``skip`` logs it and returns None (see :mod:`glassmetric.data.image_io`)
    on_bad_image: str = "error"

    def set_bad_image_policy(self, policy: str) -> RetrievalDataset:
        self.on_bad_image = check_policy(policy)
        return self

    def load_readable(self, index: int) -> Sample | None:
        """``load(index)``; None for an unreadable image under ``on_bad_image: skip`` (logged)."""
        try:
            return self.load(index)
        except DataError as e:
            if self.on_bad_image != "skip":
                raise
            skip_bad(e)
            return None

    def __getitem__(self, index: int) -> dict | None:
        sample = self.load_readable(index)
        if sample is None:
            return None
        image = self.transform(sample.image) if self.transform is not None else sample.image
        return {"image": image, "label": int(sample.label), "index": int(index)}


class Subset(RetrievalDataset):
    """The images of ``base`` at ``indices`` (used for class-range splits and validation)."""

    def __init__(self, base: RetrievalDataset, indices: Sequence[int] | np.ndarray, transform: Callable | None = None):
        super().__init__(transform if transform is not None else base.transform)
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = base.labels[self.indices]
        self.part_names = base.part_names

    def load(self, index: int) -> Sample:
        return self.base.load(int(self.indices[index]))


def split_by_classes(dataset: RetrievalDataset, classes: Sequence[int], transform: Callable | None = None) -> Subset:
    """The images of ``dataset`` whose label is in ``classes``."""
    mask = np.isin(dataset.labels, np.asarray(list(classes)))
    return Subset(dataset, np.flatnonzero(mask), transform)


class SizedDataset(Protocol):
    """A data set with a length: items by position (a sequence, a RetrievalDataset)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


class IndexedDataset(torch.utils.data.Dataset):
    """A data set whose items also carry their position ``index`` in it (to undo a sampler's
    sharding, or to know which images a pass over the data kept)."""

    def __init__(self, dataset: SizedDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict | None:
        item = self.dataset[i]
        return None if item is None else {**item, "index": i}  # None: skipped (data.on_bad_image: skip)
