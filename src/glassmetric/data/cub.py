"""CUB-200-2011 birds, split by class ranges for metric learning.

Layout read under ``root`` (the official release)::

    images.txt              <image_id> <relative path under images/>
    image_class_labels.txt  <image_id> <class_id>
    classes.txt             <class_id> <class folder name>
    bounding_boxes.txt      <image_id> <x> <y> <w> <h>              (optional)
    parts/parts.txt         <part_id> <part name, may contain spaces>  (optional, with part_locs)
    parts/part_locs.txt     <image_id> <part_id> <x> <y> <visible>  (optional, with parts)
    images/<class folder>/<file>.jpg

``train_test_split.txt`` is the classification split and is not used: metric learning trains
on one range of classes and tests on the disjoint rest (by default classes 1-100 / 101-200).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from glassmetric.data.base import RetrievalDataset, Sample
from glassmetric.data.image_io import open_image
from glassmetric.errors import ConfigError, DataError

SPLITS = ("train", "test", "all")


def read_table(path: Path, fmt: str, types: Sequence[type], header: bool = False) -> list[tuple[int, tuple]]:
    """The rows of a whitespace-separated text file as ``(line number, typed fields)``.

    Blank lines are skipped. When the last type is ``str`` that field takes the rest of the line
    (names with spaces). With ``header`` the first line must be ``fmt`` without its angle
    brackets. Errors name the file, the line and the expected ``fmt``.
    """
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    rest = types[-1] is str
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if header and lineno == 1:
                expected = fmt.replace("<", "").replace(">", "")
                if line.split() != expected.split():
                    raise DataError(f"{path}:1: expected the header '{expected}', got {line.strip()!r}")
                continue
            if not line.strip():
                continue
            fields = line.split(maxsplit=len(types) - 1) if rest else line.split()
            if len(fields) != len(types):
                raise DataError(f"{path}:{lineno}: expected '{fmt}', got {line.strip()!r}")
            try:
                rows.append((lineno, tuple(t(v.strip()) for t, v in zip(types, fields, strict=True))))
            except ValueError:
                raise DataError(f"{path}:{lineno}: expected '{fmt}', got {line.strip()!r}") from None
    return rows


def class_range(value: Sequence[int], name: str) -> tuple[int, int]:
    """An inclusive ``(first, last)`` class-id range, checked."""
    try:
        lo, hi = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a (first, last) pair of class ids, got {value!r}") from None
    if lo > hi:
        raise ConfigError(f"{name} must have first <= last, got {value!r}")
    return lo, hi


def _by_id(path: Path, rows: list[tuple[int, tuple]]) -> dict[int, tuple[int, tuple]]:
    """Rows keyed by their first field, rejecting duplicates."""
    out: dict[int, tuple[int, tuple]] = {}
    for lineno, fields in rows:
        if fields[0] in out:
            raise DataError(f"{path}:{lineno}: id {fields[0]} already given on line {out[fields[0]][0]}")
        out[fields[0]] = (lineno, fields[1:])
    return out


def _check_known(path: Path, lineno: int, image_id: int, images: dict) -> None:
    if image_id not in images:
        raise DataError(f"{path}:{lineno}: image id {image_id} is not in images.txt")


class CUB200(RetrievalDataset):
    """CUB-200-2011 images of the classes in the split's inclusive class-id range.

    ``split`` is ``"train"`` (classes ``train_classes``), ``"test"`` (``test_classes``) or
    ``"all"`` (every listed image). Labels are the original 1-based class ids and
    ``class_names[c]`` names class ``c`` (from classes.txt). Samples carry the
    bounding box and the (P, 3) part keypoints when those files exist (else ``None``).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable | None = None,
        *,
        train_classes: tuple[int, int] = (1, 100),
        test_classes: tuple[int, int] = (101, 200),
    ):
        super().__init__(transform)
        if split not in SPLITS:
            raise ConfigError(f"CUB200 split must be one of {SPLITS}, got {split!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"CUB-200-2011 folder not found: {self.root}")

        images_file = self.root / "images.txt"
        labels_file = self.root / "image_class_labels.txt"
        classes_file = self.root / "classes.txt"
        images = _by_id(images_file, read_table(images_file, "<image_id> <path>", (int, str)))
        if not images:
            raise DataError(f"{images_file} lists no images")
        classes = _by_id(classes_file, read_table(classes_file, "<class_id> <name>", (int, str)))
        labels = _by_id(labels_file, read_table(labels_file, "<image_id> <class_id>", (int, int)))
        for image_id, (lineno, (class_id,)) in labels.items():
            _check_known(labels_file, lineno, image_id, images)
            if class_id not in classes:
                raise DataError(f"{labels_file}:{lineno}: class id {class_id} is not in classes.txt")
        for image_id, (lineno, _) in images.items():
            if image_id not in labels:
                raise DataError(f"{images_file}:{lineno}: image id {image_id} has no line in image_class_labels.txt")
        self.class_names = {class_id: name for class_id, (_, (name,)) in classes.items()}

        if split == "all":
            self.image_ids = list(images)
        else:
            lo, hi = class_range(train_classes if split == "train" else test_classes, f"{split}_classes")
            self.image_ids = [i for i in images if lo <= labels[i][1][0] <= hi]
            if not self.image_ids:
                raise DataError(
                    f"CUB200 split {split!r} (classes {lo}-{hi}) has no images in {self.root}; "
                    f"set train_classes / test_classes to the class ids present"
                )
        self.labels = np.array([labels[i][1][0] for i in self.image_ids], dtype=np.int64)
        self.paths = [self.root / "images" / images[i][1][0] for i in self.image_ids]
        for image_id, path in zip(self.image_ids, self.paths, strict=True):
            if not path.is_file():
                raise DataError(f"image file not found: {path} (images.txt line {images[image_id][0]})")

        self.bboxes = self._read_bboxes(images)
        self.keypoints, self.part_names = self._read_parts(images)

    def _read_bboxes(self, images: dict) -> dict[int, tuple[float, float, float, float]] | None:
        path = self.root / "bounding_boxes.txt"
        if not path.exists():
            return None
        rows = _by_id(path, read_table(path, "<image_id> <x> <y> <w> <h>", (int, float, float, float, float)))
        for image_id, (lineno, _) in rows.items():
            _check_known(path, lineno, image_id, images)
        return {i: rows[i][1] for i in self.image_ids if i in rows}

    def _read_parts(self, images: dict) -> tuple[np.ndarray | None, tuple[str, ...]]:
        """Keypoints (images, P, 3) of the selected images; parts without a line are invisible."""
        parts_file = self.root / "parts" / "parts.txt"
        locs_file = self.root / "parts" / "part_locs.txt"
        if not parts_file.exists() and not locs_file.exists():
            return None, ()
        parts = _by_id(parts_file, read_table(parts_file, "<part_id> <name>", (int, str)))
        if sorted(parts) != list(range(1, len(parts) + 1)):
            raise DataError(f"{parts_file}: part ids must be 1..{len(parts)}, got {sorted(parts)}")
        names = tuple(parts[p][1][0] for p in range(1, len(parts) + 1))

        position = {image_id: k for k, image_id in enumerate(self.image_ids)}
        keypoints = np.zeros((len(self.image_ids), len(parts), 3), dtype=np.float32)
        fmt = "<image_id> <part_id> <x> <y> <visible>"
        for lineno, (image_id, part_id, x, y, visible) in read_table(locs_file, fmt, (int, int, float, float, float)):
            _check_known(locs_file, lineno, image_id, images)
            if part_id not in parts:
                raise DataError(f"{locs_file}:{lineno}: part id {part_id} is not in parts.txt")
            if visible not in (0.0, 1.0):
                raise DataError(f"{locs_file}:{lineno}: visible must be 0 or 1, got {visible:g}")
            if image_id in position:
                keypoints[position[image_id], part_id - 1] = (x, y, 1.0) if visible else (0.0, 0.0, 0.0)
        return keypoints, names

    def load(self, index: int) -> Sample:
        image_id = self.image_ids[index]
        return Sample(
            image=open_image(self.paths[index]),
            label=int(self.labels[index]),
            keypoints=None if self.keypoints is None else self.keypoints[index].copy(),
            bbox=None if self.bboxes is None else self.bboxes.get(image_id),
            meta={"path": str(self.paths[index]), "image_id": image_id},
        )
