"""The data set interface every loader implements.

A data set is a list of images with integer class labels. ``load(i)`` returns the raw
:class:`Sample` (a PIL image plus optional ground truth: part keypoints and a bounding box, in
the pixel coordinates of that image); ``__getitem__`` applies the transform and returns the
dictionary the training and evaluation loops batch together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

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


def open_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with an error that names the file when it cannot be read."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {path}") from e
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


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

    def __getitem__(self, index: int) -> dict:
        sample = self.load(index)
        image = self.transform(sample.image) if self.transform is not None else sample.image
        return {"image": image, "label": int(sample.label), "index": int(index)}


class Subset(RetrievalDataset):
    """The images of ``base`` at ``indices`` (used for class-range splits and validation)."""

    def __init__(self, base: RetrievalDataset, indices: Sequence[int], transform: Callable | None = None):
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
