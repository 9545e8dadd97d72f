"""The explorer's gallery: images embedded once, the embeddings cached on disk.

Either a folder (one sub-folder per class, or just images at any depth: unlabelled) or the
split of the checkpoint's own data set. With class labels, results of a query picked from
the gallery are marked correct or wrong. The cache file is named by a hash of everything the
embeddings depend on: the checkpoint's bytes, the embedding fields, the glassmetric version,
the evaluation transform (``data.image_size``, ``data.eval_image_size``, ``data.resize``, the
backbone's normalisation), the bad-image policy (``data.on_bad_image``: which images have a
row) and the gallery's fingerprint (for a folder: the relative path, size and modification
time of every image; for a split: the data config); a change to any of them gets a new file,
an unchanged one is loaded instead of embedded again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from glassmetric import __version__
from glassmetric.checkpoints import atomic_torch_save, safe_torch_load
from glassmetric.config import Config
from glassmetric.data.base import RetrievalDataset
from glassmetric.data.folder import ImageFolderDataset, _image_files, _PathDataset, class_folders
from glassmetric.errors import DataError
from glassmetric.factory import eval_transform
from glassmetric.retrieval.embed import embed_fields

if TYPE_CHECKING:
    from glassmetric.retriever.model import InferenceModel

__all__ = ["Gallery", "GallerySource", "default_cache_dir", "folder_source", "load_gallery", "split_source"]


@dataclass
class GallerySource:
    """What to embed: a data set, its image names and class names (empty: unlabelled), and a
    fingerprint that changes whenever its images do."""

    description: str
    dataset: RetrievalDataset
    names: list[str]
    class_names: tuple[str, ...]
    fingerprint: str


@dataclass
class Gallery:
    source: GallerySource
    labels: np.ndarray  #: (N,) int64
    fields: dict[str, torch.Tensor]  #: embed_fields outputs: "embedding" (N, D) and the model's others
    cache_file: Path
    from_cache: bool
    #: (N,) each row's position in ``source.dataset`` (images left out under
    #: ``data.on_bad_image: skip`` have no row); rows are what search returns
    index: np.ndarray | None = None

    def __post_init__(self):
        if self.index is None:
            self.index = np.arange(len(self.labels))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labelled(self) -> bool:
        return bool(self.source.class_names)

    def _position(self, i: int) -> int:
        """Row ``i``'s position in ``source.dataset``."""
        assert self.index is not None  # set by __post_init__
        return int(self.index[i])

    def name(self, i: int) -> str:
        """The name of the image of row ``i``."""
        return self.source.names[self._position(i)]

    def class_name(self, i: int) -> str | None:
        return self.source.class_names[int(self.labels[i])] if self.labelled else None

    def image(self, i: int) -> Image.Image:
        """The image of row ``i``."""
        return self.source.dataset.load(self._position(i)).image


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/glassmetric/gallery`` (``~/.cache/glassmetric/gallery``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "glassmetric" / "gallery"


def folder_source(root: str | Path, transform=None) -> GallerySource:
    """The class sub-folders of ``root``, or (with none) all its images, unlabelled."""
    root = Path(root)
    if class_folders(root):
        data: _PathDataset = ImageFolderDataset(root, transform=transform)
        classes = data.class_names
    else:
        files = _image_files(root)
        if not files:
            raise DataError(f"no images under the gallery folder {root}")
        data, classes = _PathDataset(files, [0] * len(files), (), transform), ()
    lines = []
    for path, label in zip(data.paths, data.labels, strict=True):
        try:
            st = path.stat()
            stamp = f"{st.st_size}\0{st.st_mtime_ns}"
        except OSError:  # a dangling link, a file gone: data.on_bad_image decides when it is read
            stamp = "unreadable"
        lines.append(f"{path.relative_to(root).as_posix()}\0{stamp}\0{label}")
    names = [p.relative_to(root).as_posix() for p in data.paths]
    return GallerySource(str(root), data, names, tuple(classes), "\n".join(lines))


def split_source(retriever, split: str = "test") -> GallerySource:
    """The ``split`` of the checkpoint's data set (its class labels as class names), from a
    :class:`glassmetric.Retriever`."""
    cfg = retriever.cfg
    name, data, _ = retriever.eval_data(split=split)
    classes = tuple(str(c) for c in range(int(data.labels.max()) + 1)) if len(data) else ()
    fingerprint = json.dumps(
        {"split": split, "data": cfg.to_dict()["data"], "n": len(data)}, sort_keys=True, default=str
    )
    return GallerySource(name, data, [f"{split} image {i}" for i in range(len(data))], classes, fingerprint)


def _cache_key(checkpoint: Path, source: GallerySource, fields: tuple[str, ...]) -> str:
    # "layout 2": the cache holds each row's data-set position ("index")
    data = source.dataset
    h = hashlib.sha256(f"glassmetric {__version__} layout 2 fields {','.join(fields)}\n".encode())
    h.update(f"transform {data.transform!r}\non_bad_image {data.on_bad_image}\n".encode())
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(source.fingerprint.encode())
    return h.hexdigest()[:32]


def load_gallery(
    model: InferenceModel,
    cfg: Config,
    checkpoint: str | Path,
    source: GallerySource,
    fields: tuple[str, ...],
    *,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Gallery:
    """Embed ``source`` with ``model`` (``fields`` of its output), or load the embeddings from
    ``cache_dir`` when neither the gallery nor the checkpoint changed."""
    source.dataset.transform = eval_transform(cfg, model)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"{_cache_key(Path(checkpoint), source, fields)}.pt"
    from_cache = cache_file.is_file()
    if from_cache:
        stored = safe_torch_load(cache_file)
        out = {k: stored[k] for k in (*fields, "labels", "index")}
    else:
        out = embed_fields(
            model, source.dataset, fields=fields, batch_size=cfg.eval.batch_size, device=device, progress=progress
        )
        atomic_torch_save({k: out[k] for k in (*fields, "labels", "index")}, cache_file)
    return Gallery(
        source=source,
        labels=out["labels"].numpy(),
        fields={k: out[k] for k in fields},
        cache_file=cache_file,
        from_cache=from_cache,
        index=out["index"].numpy(),
    )
