"""Stanford Online Products (SOP).

Layout read under ``root`` (the official release)::

    Ebay_train.txt   header 'image_id class_id super_class_id path', then one line per image
    Ebay_test.txt    same format; its classes are disjoint from the training classes
    <path>           e.g. bicycle_final/111085122871_0.JPG

The split is the file: ``split="train"`` reads ``Ebay_train.txt``, ``"test"`` ``Ebay_test.txt``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from glassmetric.data.base import RetrievalDataset, Sample
from glassmetric.data.cub import read_table
from glassmetric.data.image_io import open_image
from glassmetric.errors import ConfigError, DataError

SPLIT_FILES = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}


class StanfordOnlineProducts(RetrievalDataset):
    """The SOP images of one split file; labels are ``class_id``, ``super_labels`` ``super_class_id``."""

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None):
        super().__init__(transform)
        if split not in SPLIT_FILES:
            raise ConfigError(f"StanfordOnlineProducts split must be one of {tuple(SPLIT_FILES)}, got {split!r}")
        self.root = Path(root)
        list_file = self.root / SPLIT_FILES[split]
        fmt = "<image_id> <class_id> <super_class_id> <path>"
        rows = read_table(list_file, fmt, (int, int, int, str), header=True)
        if not rows:
            raise DataError(f"{list_file} lists no images")
        self.paths = []
        for lineno, (_, _, _, rel) in rows:
            path = self.root / rel
            if not path.is_file():
                raise DataError(f"image file not found: {path} ({list_file.name} line {lineno})")
            self.paths.append(path)
        self.image_ids = [fields[0] for _, fields in rows]
        self.labels = np.array([fields[1] for _, fields in rows], dtype=np.int64)
        self.super_labels = np.array([fields[2] for _, fields in rows], dtype=np.int64)

    def load(self, index: int) -> Sample:
        return Sample(
            image=open_image(self.paths[index]),
            label=int(self.labels[index]),
            meta={
                "path": str(self.paths[index]),
                "image_id": self.image_ids[index],
                "super_label": int(self.super_labels[index]),
            },
        )
