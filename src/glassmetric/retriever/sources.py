"""What a :class:`glassmetric.Retriever` can embed, turned into a data set with the model's
evaluation transform: a data set, an image folder (one sub-folder per class, or just images),
image files, or images in memory; and the data sets ``glassmetric eval`` / ``report`` score."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from glassmetric.config import Config
from glassmetric.data.base import RetrievalDataset, Sample
from glassmetric.data.folder import ImageFolderDataset, _image_files, _PathDataset, build_query_gallery, class_folders
from glassmetric.errors import ConfigError, DataError

__all__ = ["ImageSource", "as_dataset", "eval_datasets", "same_folder"]

#: anything :meth:`glassmetric.Retriever.embed` accepts
ImageSource = RetrievalDataset | str | Path | Image.Image | Sequence


class _MemoryDataset(RetrievalDataset):
    """Images already in memory, unlabelled (label 0)."""

    def __init__(self, images: Sequence[Image.Image], transform=None):
        super().__init__(transform)
        self.images = [im.convert("RGB") for im in images]
        self.labels = np.zeros(len(self.images), dtype=np.int64)

    def load(self, index: int) -> Sample:
        return Sample(image=self.images[index], label=0)


def folder_dataset(root: str | Path, transform=None) -> RetrievalDataset:
    """``root`` with one sub-folder per class (labelled), or else every image under it (label 0)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    if class_folders(root):
        return ImageFolderDataset(root, transform=transform)
    paths = _image_files(root)
    if not paths:
        raise DataError(f"no images under {root}")
    return _PathDataset(paths, [0] * len(paths), (), transform)


def as_dataset(source: ImageSource, transform) -> RetrievalDataset:
    """``source`` as a data set whose transform is ``transform`` (a data set's own transform is
    replaced: embeddings are always taken with the evaluation transform)."""
    if isinstance(source, RetrievalDataset):
        source.transform = transform
        return source
    if isinstance(source, Image.Image):
        return _MemoryDataset([source], transform)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return folder_dataset(path, transform)
        return _PathDataset([path], [0], (), transform)
    items = list(source)
    if all(isinstance(x, Image.Image) for x in items):
        return _MemoryDataset(items, transform)
    if all(isinstance(x, (str, Path)) for x in items):
        return _PathDataset([Path(x) for x in items], [0] * len(items), (), transform)
    raise TypeError("expected a RetrievalDataset, a folder, an image file, a PIL image, or a list of files or images")


def same_folder(a: str | Path, b: str | Path) -> bool:
    """Do two paths name the same folder (after resolving links and ``..``)?"""
    return Path(a).resolve() == Path(b).resolve()


def eval_datasets(
    cfg: Config,
    transform,
    *,
    split: str = "test",
    query: str | None = None,
    gallery: str | None = None,
    folder: str | None = None,
    splits=None,
) -> tuple[str, RetrievalDataset, RetrievalDataset | None]:
    """``(description, queries, gallery or None)`` to evaluate on, with the evaluation
    ``transform``: ``folder`` (one sub-folder per class) searched against itself, each query left
    out of its own results; ``query`` images against ``gallery`` images (classes matched by
    folder name; the same folder twice is the ``folder`` case); or else the ``split`` of
    ``splits`` (:func:`glassmetric.factory.make_splits`; the test split with its cross-domain
    gallery, if the data has one)."""
    if bool(query) != bool(gallery):
        raise ConfigError("--query and --gallery go together: give both folders")
    if folder and query:
        raise ConfigError("give either --data or --query / --gallery, not both")
    if query and gallery and same_folder(query, gallery):  # query and gallery go together (above)
        folder = query
    if folder:
        images = ImageFolderDataset(folder, transform=transform)
        return f"images of {folder}", images.set_bad_image_policy(cfg.data.on_bad_image), None
    if query and gallery:
        pair = build_query_gallery(query, gallery, transform=transform)
        _check_shared_folders(pair, query, gallery)
        pair.query.set_bad_image_policy(cfg.data.on_bad_image)
        pair.gallery.set_bad_image_policy(cfg.data.on_bad_image)
        return f"query {query} / gallery {gallery}", pair.query, pair.gallery
    dataset, ref = getattr(splits, split), (splits.gallery if split == "test" else None)
    if dataset is None:
        raise ConfigError(f"--split {split}: this config has no {split} split (data.val_classes = 0)")
    if split == "train":
        dataset.transform = splits.test.transform  # evaluate without augmentation
    return (
        f"{split} split of {cfg.data.name}" + (" (cross-domain: query / gallery)" if ref is not None else ""),
        dataset,
        ref,
    )


def _check_shared_folders(pair, query: str, gallery: str) -> None:
    """ConfigError when no class folder with images is in both ``query`` and ``gallery``."""
    names = pair.query.class_names
    q, g = (sorted(names[i] for i in np.unique(d.labels)) for d in (pair.query, pair.gallery))
    if not set(q) & set(g):

        def few(classes: list[str]) -> str:
            return ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")

        raise ConfigError(
            f"--query {query} and --gallery {gallery} share no class folder (classes are matched by folder name): "
            f"query {len(q)} ({few(q)}), gallery {len(g)} ({few(g)})"
        )
