"""Stanford Cars (Cars196), split by class ranges for metric learning.

Layout read under ``root`` (the ``cars_annos.mat`` release)::

    cars_annos.mat   annotations: struct array, one element per image, with fields
                         relative_im_path (e.g. 'car_ims/000001.jpg'), bbox_x1, bbox_y1,
                         bbox_x2, bbox_y2 (1-based inclusive pixels), class (1..196), test
                     class_names: cell array of the 196 class names
    car_ims/000001.jpg ...   (at root/<relative_im_path>)

The ``test`` field is the classification split and is not used: metric learning trains on
classes 1-98 and tests on 99-196 by default.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.io

from glassmetric.data.base import RetrievalDataset, Sample
from glassmetric.data.cub import SPLITS, class_range
from glassmetric.data.image_io import open_image
from glassmetric.errors import ConfigError, DataError

FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class")


def _scalar(value):
    """Unwrap the nested one-element arrays that ``loadmat`` puts around every MATLAB value."""
    while isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"expected one value, got an array of shape {value.shape}")
        value = value.reshape(-1)[0]
    return value


class Cars196(RetrievalDataset):
    """Cars196 images of the classes in the split's inclusive class-id range.

    ``split`` is ``"train"`` (``train_classes``), ``"test"`` (``test_classes``) or ``"all"``.
    Labels are the original 1-based class ids; ``class_names[c]`` names class ``c``. Samples
    carry the bounding box as (x, y, w, h) in 0-based pixels: (x1 - 1, y1 - 1, x2 - x1 + 1,
    y2 - y1 + 1).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable | None = None,
        *,
        train_classes: tuple[int, int] = (1, 98),
        test_classes: tuple[int, int] = (99, 196),
    ):
        super().__init__(transform)
        if split not in SPLITS:
            raise ConfigError(f"Cars196 split must be one of {SPLITS}, got {split!r}")
        self.root = Path(root)
        mat_path = self.root / "cars_annos.mat"
        if not mat_path.is_file():
            raise DataError(f"file not found: {mat_path}")
        try:
            mat = scipy.io.loadmat(str(mat_path))
        except (scipy.io.matlab.MatReadError, ValueError, OSError, NotImplementedError) as e:
            raise DataError(f"cannot read {mat_path}: {e}") from e
        for key in ("annotations", "class_names"):
            if key not in mat:
                raise DataError(f"{mat_path}: no '{key}' variable")

        try:
            names = [str(_scalar(n)) for n in np.asarray(mat["class_names"]).reshape(-1)]
        except ValueError as e:
            raise DataError(f"{mat_path}: class_names: {e}") from e
        self.class_names = dict(enumerate(names, start=1))
        annotations = np.asarray(mat["annotations"]).reshape(-1)
        missing = [f for f in FIELDS if f not in (annotations.dtype.names or ())]
        if missing:
            raise DataError(f"{mat_path}: annotations lack the fields {missing}")
        if split == "all":
            lo, hi = 1, len(names)
        else:
            lo, hi = class_range(train_classes if split == "train" else test_classes, f"{split}_classes")

        paths, labels, bboxes = [], [], []
        for k, record in enumerate(annotations):
            try:
                rel, x1, y1, x2, y2, label = (_scalar(record[f]) for f in FIELDS)
                x1, y1, x2, y2, label = float(x1), float(y1), float(x2), float(y2), int(label)
            except (ValueError, TypeError) as e:
                raise DataError(f"{mat_path}: annotation {k + 1}: {e}") from e
            if not 1 <= label <= len(names):
                raise DataError(f"{mat_path}: annotation {k + 1}: class {label} is not in 1..{len(names)}")
            if lo <= label <= hi:
                path = self.root / str(rel)
                if not path.is_file():
                    raise DataError(f"image file not found: {path} (annotation {k + 1} in {mat_path})")
                paths.append(path)
                labels.append(label)
                bboxes.append((x1 - 1.0, y1 - 1.0, x2 - x1 + 1.0, y2 - y1 + 1.0))
        if not paths:
            raise DataError(
                f"Cars196 split {split!r} (classes {lo}-{hi}) has no images in {mat_path}; "
                f"set train_classes / test_classes to the class ids present"
            )
        self.paths = paths
        self.labels = np.array(labels, dtype=np.int64)
        self.bboxes = bboxes

    def load(self, index: int) -> Sample:
        return Sample(
            image=open_image(self.paths[index]),
            label=int(self.labels[index]),
            bbox=self.bboxes[index],
            meta={"path": str(self.paths[index])},
        )
