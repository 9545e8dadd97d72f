"""A faiss gallery index for large galleries, chosen by gallery size, saved with a JSON manifest.

Kinds (inner product, i.e. cosine of L2-normalised embeddings):

* ``exact``: ``IndexFlatIP``, brute force, the same neighbours as :func:`.knn.knn`;
* ``hnsw``: ``IndexHNSWFlat`` (Malkov & Yashunin 2018), a graph: fast queries, slower to build;
* ``ivf``: ``IndexIVFFlat``, k-means cells of which ``nprobe`` are scanned per query: quick to
  build for millions of vectors.

``kind="auto"`` picks exact below ``exact_below`` items, HNSW below ``hnsw_below``, IVF above
(:class:`glassmetric.config.IndexConfig`, ``eval.index`` in a config). An approximate index can
miss neighbours; :func:`glassmetric.retrieval.rerank.structural_rerank` re-scores its shortlist.

An approximate search is tuned to ``target_recall`` (0.95 by default): its recall@10 is
estimated on 200 gallery items searched for their neighbours and compared with exact search,
and ``nprobe`` / ``ef_search`` are doubled until the estimate reaches the target (for IVF at
worst every list is probed, which is exact). The estimate is kept in ``params["recall@10"]``.
An HNSW graph that cannot reach the target, and an IVF index that the tuning makes probe over
a quarter of its lists, warn (:class:`IndexRecallWarning`).

A saved index is a folder: ``index.faiss`` (``faiss.write_index``) and ``index.json``
(format, kind, dim, size, metric, parameters, the search settings asked for, faiss version,
and the fingerprint of the embeddings it holds), checked on load.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Literal, cast

import numpy as np
import torch
from torch import Tensor

from glassmetric.config import IndexConfig
from glassmetric.errors import IndexFileError

from .knn import import_faiss, iter_faiss_index

#: the kinds of a built index (``eval.index.kind`` also takes ``auto``)
IndexKind = Literal["exact", "hnsw", "ivf"]

__all__ = ["FORMAT", "GalleryIndex", "IndexRecallWarning", "build_plan", "choose_kind", "fingerprint"]

FORMAT = "glassmetric-gallery-index/1"
MANIFEST, INDEX_FILE = "index.json", "index.faiss"
KINDS = ("exact", "hnsw", "ivf")
#: gallery items whose neighbours estimate the recall, and the depth of that recall
RECALL_QUERIES, RECALL_K = 200, 10
#: the widest HNSW beam the tuning tries (beyond it a search costs about as much as exact search)
EF_SEARCH_MAX = 4096


class IndexRecallWarning(UserWarning):
    """The tuned approximate search stays below ``eval.index.target_recall``, or the tuning
    raised it to scanning over a quarter of the gallery (no faster than exact search)."""


def fingerprint(vectors: Tensor | np.ndarray) -> str:
    """A hash of the float32 bytes and shape of ``vectors``: it changes with the checkpoint, the
    gallery and the transform that made them."""
    x = _as_array(vectors)
    h = hashlib.blake2b(f"{x.shape}".encode(), digest_size=16)
    h.update(memoryview(x).cast("B"))  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only for Python >= 3.12
    return "blake2b:" + h.hexdigest()


def choose_kind(size: int, settings: IndexConfig | None = None) -> str:
    """The index kind for a gallery of ``size`` items."""
    settings = IndexConfig() if settings is None else settings
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


def _search_request(settings: IndexConfig) -> dict:
    """The search settings asked for (before tuning), as the manifest records them."""
    return {"nprobe": settings.nprobe, "ef_search": settings.ef_search, "target_recall": settings.target_recall}


def build_plan(size: int, settings: IndexConfig | None = None) -> tuple[str, dict]:
    """``(kind, build parameters)`` of an index over ``size`` items under ``settings``."""
    settings = IndexConfig() if settings is None else settings
    kind = choose_kind(size, settings)
    if kind == "hnsw":
        return kind, {"hnsw_m": settings.hnsw_m, "ef_construction": settings.ef_construction}
    if kind == "ivf":  # >= 39 training points a cell
        return kind, {"nlist": max(1, min(settings.nlist or default_nlist(size), size // 39 or 1))}
    if kind != "exact":
        raise ValueError(f"unknown index kind {kind!r}; choose from {KINDS}")
    return kind, {}


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
        #: :func:`fingerprint` of the indexed vectors (None: unknown)
        self.fingerprint: str | None = None
        #: the search settings asked for (nprobe, ef_search, target_recall) before tuning
        self.search_request: dict | None = None

    @property
    def dim(self) -> int:
        return int(self.faiss_index.d)

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def __repr__(self) -> str:
        return f"GalleryIndex(kind={self.kind!r}, size={len(self)}, dim={self.dim}, params={self.params})"

    @classmethod
    def build(cls, vectors: Tensor | np.ndarray, settings: IndexConfig | None = None, *, seed: int = 0) -> GalleryIndex:
        """Index ``vectors`` ``(N, D)`` (row i gets id i) with the kind :func:`choose_kind` picks,
        its search tuned to ``settings.target_recall`` (see :meth:`set_search_params`)."""
        settings = IndexConfig() if settings is None else settings
        faiss = import_faiss()
        x = _as_array(vectors)
        n, d = x.shape
        kind, params = build_plan(n, settings)
        metric = faiss.METRIC_INNER_PRODUCT
        if kind == "exact":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, settings.hnsw_m, metric)
            index.hnsw.efConstruction = settings.ef_construction
        else:
            nlist = params["nlist"]
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, metric)
            # k-means on at most 64 points per cell (faiss warns below 39): seconds, not minutes
            sample = (
                x if n <= 64 * nlist else x[np.sort(np.random.default_rng(seed).choice(n, 64 * nlist, replace=False))]
            )
            index.cp.seed = seed
            index.train(sample)
        index.add(x)
        out = cls(index, kind, params)
        out.fingerprint = fingerprint(x)
        out.set_search_params(settings, x, seed=seed)
        return out

    def set_search_params(
        self, settings: IndexConfig, vectors: Tensor | np.ndarray | None = None, *, seed: int = 0
    ) -> None:
        """Search-time knobs: HNSW ``ef_search``, IVF ``nprobe`` (capped at ``nlist``). With
        ``settings.target_recall`` and the indexed ``vectors``, the knob is then doubled until
        the recall@10 :meth:`estimate_recall` measures reaches the target (IVF: at most every
        list, an exact search; HNSW: at most :data:`EF_SEARCH_MAX`, with an
        :class:`IndexRecallWarning` when that is not enough)."""
        self.search_request = _search_request(settings)
        self.params.pop("recall@10", None)
        if self.kind == "exact":
            return
        self._set_knob(settings.ef_search if self.kind == "hnsw" else min(settings.nprobe, self.faiss_index.nlist))
        target = settings.target_recall
        if target is None or vectors is None:
            return
        x = _as_array(vectors)
        limit = EF_SEARCH_MAX if self.kind == "hnsw" else int(self.faiss_index.nlist)
        start, recall = self._knob(), self.estimate_recall(x, seed=seed)
        while recall < target and self._knob() < limit:
            self._set_knob(min(limit, 2 * self._knob()))
            recall = self.estimate_recall(x, seed=seed)
        self.params["recall@10"] = round(recall, 4)
        if self.kind == "ivf" and self._knob() > max(start, limit // 4):
            warnings.warn(
                f"the ivf gallery index reaches an estimated recall@10 of {recall:.3f} only by probing {self._knob()} "
                f"of its {limit} lists ({100 * self._knob() / limit:.0f}% of the gallery per query): on these "
                "embeddings exact search (eval.index.kind=exact) is about as fast",
                IndexRecallWarning,
                stacklevel=2,
            )
        if recall < target:
            warnings.warn(
                f"the {self.kind} gallery index reaches an estimated recall@10 of {recall:.3f} at ef_search "
                f"{self._knob()}, below eval.index.target_recall {target}: build it with a larger "
                "eval.index.hnsw_m or ef_construction, or use eval.index.kind=ivf or exact",
                IndexRecallWarning,
                stacklevel=2,
            )

    def _knob(self) -> int:
        return int(self.faiss_index.hnsw.efSearch if self.kind == "hnsw" else self.faiss_index.nprobe)

    def _set_knob(self, value: int) -> None:
        if self.kind == "hnsw":
            self.faiss_index.hnsw.efSearch = int(value)
            self.params["ef_search"] = int(value)
        elif self.kind == "ivf":
            self.faiss_index.nprobe = int(value)
            self.params["nprobe"] = int(value)

    def estimate_recall(
        self, vectors: Tensor | np.ndarray, *, k: int = RECALL_K, queries: int = RECALL_QUERIES, seed: int = 0
    ) -> float:
        """recall@``k`` of the current search: ``queries`` indexed items (a seeded sample of
        ``vectors``, the indexed ones) searched for their ``k`` nearest other items; the share
        of the exact top ``k`` that the index returns."""
        from .knn import knn

        x = _as_array(vectors)
        n = len(x)
        k = min(k, n - 1)
        if k < 1:
            return 1.0
        own = np.sort(np.random.default_rng(seed).choice(n, min(queries, n), replace=False))
        _, exact = knn(torch.from_numpy(x[own]), torch.from_numpy(x), k + 1)
        _, approximate = self.faiss_index.search(x[own], k + 1)
        truth, found = _drop_own(exact.numpy(), own, k), _drop_own(approximate, own, k)
        hits = sum(len(set(a[a >= 0].tolist()) & set(b.tolist())) for a, b in zip(found, truth, strict=True))
        return hits / truth.size

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

    def mismatch(self, gallery: Tensor | np.ndarray, settings: IndexConfig | None = None) -> str | None:
        """Why this index does not serve ``gallery`` under ``settings`` (another size, other
        embeddings, another kind or build parameters), or None when it does."""
        settings = IndexConfig() if settings is None else settings
        x = _as_array(gallery)
        if x.shape != (len(self), self.dim):
            return f"holds {len(self)} vectors of dim {self.dim}, the gallery is {x.shape}"
        if self.fingerprint is None:
            return "does not record which embeddings it holds"
        if self.fingerprint != fingerprint(x):
            return "was built from other embeddings (another checkpoint, gallery or transform)"
        kind, params = build_plan(len(x), settings)
        built = {
            key: self.params.get(key) for key in build_plan(len(x), IndexConfig(kind=cast(IndexKind, self.kind)))[1]
        }  # a kind choose_kind picked
        if (kind, params) != (self.kind, built):
            return f"is {_describe(self.kind, built)}, eval.index asks for {_describe(kind, params)}"
        return None

    def save(self, folder: str | Path) -> Path:
        """Write ``index.faiss`` and ``index.json`` into ``folder`` (created); return it.

        The old manifest is removed first and the new one written last (each file through a
        temporary and a rename), so a write cut short never leaves a manifest describing
        another index. IndexFileError when the folder cannot be written."""
        faiss = import_faiss()
        folder = Path(folder)
        manifest = {
            "format": FORMAT,
            "kind": self.kind,
            "dim": self.dim,
            "size": len(self),
            "metric": "inner_product",
            "params": self.params,
            "search_request": self.search_request,
            "fingerprint": self.fingerprint,
            "faiss": faiss.__version__,
        }
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / MANIFEST).unlink(missing_ok=True)
            faiss.write_index(self.faiss_index, str(folder / f".{INDEX_FILE}.tmp"))
            (folder / f".{INDEX_FILE}.tmp").replace(folder / INDEX_FILE)
            (folder / f".{MANIFEST}.tmp").write_text(json.dumps(manifest, indent=2))
            (folder / f".{MANIFEST}.tmp").replace(folder / MANIFEST)
        except (OSError, RuntimeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            raise IndexFileError(f"cannot write the gallery index to {folder}: {reason}") from e
        return folder

    @classmethod
    def load(cls, folder: str | Path, settings: IndexConfig | None = None) -> GalleryIndex:
        """Read a folder written by :meth:`save`. Its stored (tuned) search knobs are kept, unless
        ``settings`` ask for other ones: those are then set as given, untuned."""
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
        out.fingerprint = manifest.get("fingerprint")
        out.search_request = manifest.get("search_request")
        if settings is None or _search_request(settings) == out.search_request:
            knob = "ef_search" if out.kind == "hnsw" else "nprobe"
            out._set_knob(out.params.get(knob, getattr(IndexConfig(), knob)))  # as stored (tuned)
        else:  # other search settings: set, not tuned (that needs the vectors: set_search_params)
            out.set_search_params(settings)
        return out


def _describe(kind: str, params: dict) -> str:
    return f"{kind}" + (f" ({', '.join(f'{k} {v}' for k, v in params.items())})" if params else "")


def _drop_own(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` ids of each row of ``k + 1`` other than the row's own item (else the first ``k``)."""
    keep = ids != own[:, None]
    keep[keep.all(1), -1] = False
    return ids[keep].reshape(len(ids), k)
