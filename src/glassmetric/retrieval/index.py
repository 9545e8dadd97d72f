"""A faiss gallery index for large galleries, chosen by gallery size, saved with a JSON manifest.

Kinds (inner product, i.e. cosine of L2-normalised embeddings):

* ``exact``: ``IndexFlatIP``, brute force, the same neighbours as :func:`.knn.knn`;
* ``hnsw``: ``IndexHNSWFlat`` (Malkov & Yashunin 2018), a graph: fast queries, slower to build;
* ``ivf``: ``IndexIVFFlat``, k-means cells of which ``nprobe`` are scanned per query: quick to
  build for millions of vectors.

``kind="auto"`` picks exact below ``exact_below`` items, HNSW below ``hnsw_below``, IVF above
(:class:`glassmetric.config.IndexConfig`, ``eval.index`` in a config). An approximate index can
miss neighbours; :func:`glassmetric.retrieval.rerank.structural_rerank` re-scores its shortlist.

A saved index is a folder: ``index.faiss`` (``faiss.write_index``) and ``index.json``
(format, kind, dim, size, metric, parameters, faiss version), checked on load.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from glassmetric.config import IndexConfig
from glassmetric.errors import IndexFileError

from .knn import import_faiss, iter_faiss_index

__all__ = ["FORMAT", "GalleryIndex", "choose_kind"]

FORMAT = "glassmetric-gallery-index/1"
MANIFEST, INDEX_FILE = "index.json", "index.faiss"
KINDS = ("exact", "hnsw", "ivf")


def choose_kind(size: int, settings: IndexConfig = IndexConfig()) -> str:
    """The index kind for a gallery of ``size`` items."""
    if settings.kind != "auto":
        return settings.kind
    if size < settings.exact_below:
        return "exact"
    return "hnsw" if size < settings.hnsw_below else "ivf"


def _as_array(vectors: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(vectors, Tensor):
        vectors = vectors.detach().float().cpu().numpy()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise ValueError(f"gallery vectors must be 2-D (n, dim), got shape {vectors.shape}")
    return vectors


def default_nlist(size: int) -> int:
    """IVF cells when ``eval.index.nlist`` is None: faiss's 4 sqrt(N), capped at 4096 so that the
    k-means (on at most 64 points a cell) stays within minutes."""
    return max(1, min(4096, int(4 * math.sqrt(size))))


class GalleryIndex:
    """A faiss index over a gallery: ``search(queries, k) -> (scores, ids)``.

    Build with :meth:`build`, or :meth:`load` a saved one. ``params`` are the settings that
    shaped it (for IVF the resolved ``nlist``), as stored in the manifest.
    """

    def __init__(self, faiss_index, kind: str, params: dict):
        self.faiss_index = faiss_index
        self.kind = kind
        self.params = dict(params)

    @property
    def dim(self) -> int:
        return int(self.faiss_index.d)

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def __repr__(self) -> str:
        return f"GalleryIndex(kind={self.kind!r}, size={len(self)}, dim={self.dim}, params={self.params})"

    @classmethod
    def build(cls, vectors: Tensor | np.ndarray, settings: IndexConfig = IndexConfig(), *, seed: int = 0) -> "GalleryIndex":
        """Index ``vectors`` ``(N, D)`` (row i gets id i) with the kind :func:`choose_kind` picks."""
        faiss = import_faiss()
        x = _as_array(vectors)
        n, d = x.shape
        kind = choose_kind(n, settings)
        metric = faiss.METRIC_INNER_PRODUCT
        if kind == "exact":
            index, params = faiss.IndexFlatIP(d), {}
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, settings.hnsw_m, metric)
            index.hnsw.efConstruction = settings.ef_construction
            params = {"hnsw_m": settings.hnsw_m, "ef_construction": settings.ef_construction}
        elif kind == "ivf":
            nlist = max(1, min(settings.nlist or default_nlist(n), n // 39 or 1))  # >= 39 training points a cell
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, metric)
            # k-means on at most 64 points per cell (faiss warns below 39): seconds, not minutes
            sample = x if n <= 64 * nlist else x[np.sort(np.random.default_rng(seed).choice(n, 64 * nlist, replace=False))]
            index.cp.seed = seed
            index.train(sample)
            params = {"nlist": nlist}
        else:
            raise ValueError(f"unknown index kind {kind!r}; choose from {KINDS}")
        index.add(x)
        out = cls(index, kind, params)
        out.set_search_params(settings)
        return out

    def set_search_params(self, settings: IndexConfig) -> None:
        """Search-time knobs: HNSW ``ef_search``, IVF ``nprobe`` (capped at ``nlist``)."""
        if self.kind == "hnsw":
            self.faiss_index.hnsw.efSearch = settings.ef_search
            self.params["ef_search"] = settings.ef_search
        elif self.kind == "ivf":
            self.faiss_index.nprobe = min(settings.nprobe, self.faiss_index.nlist)
            self.params["nprobe"] = int(self.faiss_index.nprobe)

    def search(self, queries: Tensor | np.ndarray, k: int, *, exclude_self: bool = False) -> tuple[Tensor, Tensor]:
        """``(scores, ids)``, both ``(Q, k)``: float32 inner products best first and int64 ids
        (-1 with score ``-inf`` where an approximate index found fewer than ``k``). With
        ``exclude_self``, query ``i`` is indexed item ``i`` and is left out of its results."""
        q = torch.as_tensor(queries).float()
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got shape {tuple(q.shape)}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(self) - int(exclude_self):
            raise ValueError(f"k must be in [1, {len(self) - int(exclude_self)}], got {k!r}")
        chunks = list(iter_faiss_index(self.faiss_index, q, int(k), exclude_self=exclude_self))
        if not chunks:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
        return torch.cat([c[1] for c in chunks]), torch.cat([c[2] for c in chunks])

    def check_fits(self, gallery: Tensor) -> None:
        """IndexFileError unless the index holds as many vectors of the same size as ``gallery``."""
        if tuple(gallery.shape) != (len(self), self.dim):
            raise IndexFileError(
                f"the gallery index holds {len(self)} vectors of dim {self.dim}, the gallery is {tuple(gallery.shape)}"
            )

    def save(self, folder: str | Path) -> Path:
        """Write ``index.faiss`` and ``index.json`` into ``folder`` (created); return it."""
        faiss = import_faiss()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.faiss_index, str(folder / INDEX_FILE))
        manifest = {
            "format": FORMAT, "kind": self.kind, "dim": self.dim, "size": len(self),
            "metric": "inner_product", "params": self.params, "faiss": faiss.__version__,
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path, settings: IndexConfig | None = None) -> "GalleryIndex":
        """Read a folder written by :meth:`save`; ``settings`` override the stored search knobs."""
        faiss = import_faiss()
        folder = Path(folder)
        path = folder / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except OSError as e:
            raise IndexFileError(f"cannot read gallery index manifest {path}: {e.strerror or e}") from e
        except json.JSONDecodeError as e:
            raise IndexFileError(f"gallery index manifest {path} is not valid JSON: {e}") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("kind") not in KINDS:
            raise IndexFileError(f"{path}: not a glassmetric gallery index manifest (format {FORMAT})")
        try:
            index = faiss.read_index(str(folder / INDEX_FILE))
        except RuntimeError as e:
            raise IndexFileError(f"cannot read gallery index {folder / INDEX_FILE}: {str(e).splitlines()[0]}") from e
        if (index.d, index.ntotal) != (manifest.get("dim"), manifest.get("size")):
            raise IndexFileError(
                f"{folder / INDEX_FILE} holds {index.ntotal} vectors of dim {index.d}, its manifest says "
                f"{manifest.get('size')} of dim {manifest.get('dim')}"
            )
        out = cls(index, manifest["kind"], manifest.get("params", {}))
        stored = {k: v for k, v in out.params.items() if k in ("ef_search", "nprobe")}
        out.set_search_params(settings if settings is not None else dataclasses.replace(IndexConfig(), **stored))
        return out
