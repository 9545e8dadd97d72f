"""Gallery search behind one small interface, so an approximate index can replace the exact one.

A :class:`GallerySearch` takes query embeddings and returns each query's top-``k`` gallery
scores and indices (inner product of L2-normalised embeddings, best first). :class:`ExactSearch`
is the default; :class:`IndexSearch` serves a faiss :class:`~glassmetric.retrieval.index.GalleryIndex`
(exact, HNSW or IVF by gallery size), for galleries too large to scan per request.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from glassmetric.retrieval.knn import knn

__all__ = ["ExactSearch", "GallerySearch", "IndexSearch", "top_k"]


class GallerySearch(Protocol):
    size: int

    def search(self, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """``(scores, indices)``, both ``(Q, k)``, for ``query (Q, D)``; ``1 <= k <= size``."""
        ...


class ExactSearch:
    """Exact chunked kNN (:func:`glassmetric.retrieval.knn.knn`) over the gallery embeddings."""

    def __init__(self, embeddings: Tensor):
        self.embeddings = embeddings.float().contiguous()
        self.size = len(self.embeddings)

    def search(self, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return knn(query.float(), self.embeddings, k)

    def __repr__(self) -> str:
        return f"ExactSearch(size={self.size})"


class IndexSearch:
    """A faiss gallery index (:class:`glassmetric.retrieval.index.GalleryIndex`); an approximate
    one may return fewer than ``k`` hits (id -1), which :func:`top_k` drops."""

    def __init__(self, index):
        self.index = index
        self.size = len(index)

    def search(self, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return self.index.search(query.float(), k)

    def __repr__(self) -> str:
        return f"IndexSearch({self.index!r})"


def top_k(search: GallerySearch, query: Tensor, k: int, exclude: int | None = None) -> tuple[Tensor, Tensor]:
    """One query's ``(scores (k',), indices (k',))``, leaving gallery item ``exclude`` out
    (the query itself, when it was picked from the gallery); ``k' = min(k, what is left)``."""
    extra = int(exclude is not None)
    k = min(k, search.size - extra)
    scores, idx = search.search(query.reshape(1, -1), min(k + extra, search.size))
    scores, idx = scores[0], idx[0]
    keep = idx >= 0  # an approximate index marks missing hits with -1
    if exclude is not None:
        keep &= idx != exclude
    scores, idx = scores[keep], idx[keep]
    return scores[:k], idx[:k]
