"""Generic data sets: a folder per class, a CSV list, and cross-domain query/gallery pairs.

``ImageFolderDataset`` reads::

    root/<class name>/**/<image>.{jpg,jpeg,png,bmp,webp,tif,tiff}   (any case, any depth)

Hidden files and folders (name starting with '.') and files with other extensions are ignored.

``CSVDataset`` reads a CSV file with a header naming (at least) the columns ``path`` and
``label``; relative paths are resolved against ``root``, or the CSV's own folder.

``build_query_gallery`` reads two such class folders, for instance photos as queries and
paintings as gallery, and gives both the same labels by matching class folder NAMES.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glassmetric.data.base import RetrievalDataset, Sample
from glassmetric.data.image_io import open_image
from glassmetric.errors import ConfigError, DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


def class_folders(root: str | Path) -> list[str]:
    """The sorted names of the non-hidden sub-folders of ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` at any depth, sorted by relative path."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files.extend(
            Path(dirpath, name)
            for name in filenames
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
        )
    return sorted(files, key=lambda p: p.relative_to(folder).parts)


class _PathDataset(RetrievalDataset):
    """Images given as a list of paths with labels."""

    def __init__(self, paths: list[Path], labels: list[int], class_names: Sequence[str], transform: Callable | None):
        super().__init__(transform)
        self.paths = paths
        self.labels = np.array(labels, dtype=np.int64)
        self.class_names = tuple(class_names)

    def load(self, index: int) -> Sample:
        return Sample(
            image=open_image(self.paths[index]), label=int(self.labels[index]), meta={"path": str(self.paths[index])}
        )


class ImageFolderDataset(_PathDataset):
    """One sub-folder of ``root`` per class; label ``i`` is the class named ``class_names[i]``.

    ``classes`` fixes the class names and their order (default: the sorted sub-folder names).
    A name without a folder under ``root`` gets its label but no images, and a sub-folder not
    in ``classes`` is ignored, so several roots can share one label space.
    """

    def __init__(self, root: str | Path, classes: Sequence[str] | None = None, transform: Callable | None = None):
        self.root = Path(root)
        names = class_folders(self.root) if classes is None else list(classes)
        if len(set(names)) != len(names):
            raise ConfigError(f"classes contains duplicate names: {names}")
        paths, labels = [], []
        for label, name in enumerate(names):
            folder = self.root / name
            if folder.is_dir():
                files = _image_files(folder)
                paths += files
                labels += [label] * len(files)
        if not paths:
            raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in class folders under {self.root}")
        super().__init__(paths, labels, names, transform)


class CSVDataset(_PathDataset):
    """Images listed in a CSV file with the columns ``path`` and ``label`` (plus any others).

    Labels may be integers or strings; the distinct values, sorted (numerically when all are
    integers), become ids 0, 1, ... and ``class_names[i]`` is the text of value ``i``.
    """

    def __init__(self, csv_path: str | Path, root: str | Path | None = None, transform: Callable | None = None):
        self.csv_path = Path(csv_path)
        self.root = Path(root) if root is not None else self.csv_path.parent
        rows = self._read_rows()
        raw = [label for _, _, label in rows]
        try:
            keys: list = [int(v) for v in raw]
        except ValueError:
            keys = raw
        names = sorted(set(keys))
        ids = {key: i for i, key in enumerate(names)}
        paths = []
        for lineno, rel, _ in rows:
            path = self.root / rel
            if not path.is_file():
                raise DataError(f"image file not found: {path} ({self.csv_path}:{lineno})")
            paths.append(path)
        super().__init__(paths, [ids[k] for k in keys], [str(n) for n in names], transform)

    def _read_rows(self) -> list[tuple[int, str, str]]:
        """``(line number, path, label)`` per data row."""
        if not self.csv_path.is_file():
            raise DataError(f"file not found: {self.csv_path}")
        rows = []
        with self.csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if "path" not in header or "label" not in header:
                raise DataError(f"{self.csv_path}:1: the header must name the columns 'path' and 'label', got {header}")
            ip, il = header.index("path"), header.index("label")
            for row in reader:
                if not any(v.strip() for v in row):
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{self.csv_path}:{reader.line_num}: expected {len(header)} columns, got {len(row)}"
                    )
                path, label = row[ip].strip(), row[il].strip()
                if not path or not label:
                    raise DataError(f"{self.csv_path}:{reader.line_num}: empty path or label")
                rows.append((reader.line_num, path, label))
        if not rows:
            raise DataError(f"{self.csv_path} lists no images")
        return rows


@dataclass
class QueryGallery:
    """A retrieval evaluation pair: every query image is searched for among the gallery images.

    Both sides share one label space, so a query is correctly matched by the gallery images of
    its class.
    """

    query: RetrievalDataset
    gallery: RetrievalDataset


def build_query_gallery(
    query_root: str | Path, gallery_root: str | Path, transform: Callable | None = None
) -> QueryGallery:
    """Cross-domain query/gallery sets from two class folders whose class names are matched.

    Labels index the sorted union of the two roots' class folder names, so they agree across
    the two domains. A class may exist on one side only: gallery-only classes are distractors,
    and a query whose class has no gallery image is kept in the query set although it has no
    correct match (how a metric scores such a query is the metric's decision).
    """
    names = sorted(set(class_folders(query_root)) | set(class_folders(gallery_root)))
    return QueryGallery(
        query=ImageFolderDataset(query_root, names, transform),
        gallery=ImageFolderDataset(gallery_root, names, transform),
    )
