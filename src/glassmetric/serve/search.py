"""Gallery search behind one small interface, so an approximate index can replace the exact one.

A :class:`GallerySearch` takes query embeddings and returns each query's top-``k`` gallery
scores and indices (inner product of L2-normalised embeddings, best first).
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from glassmetric.retrieval.knn import knn

__all__ = ["ExactSearch", "GallerySearch", "top_k"]


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


def top_k(search: GallerySearch, query: Tensor, k: int, exclude: int | None = None) -> tuple[Tensor, Tensor]:
    """One query's ``(scores (k',), indices (k',))``, leaving gallery item ``exclude`` out
    (the query itself, when it was picked from the gallery); ``k' = min(k, what is left)``."""
    extra = int(exclude is not None)
    k = min(k, search.size - extra)
    scores, idx = search.search(query.reshape(1, -1), min(k + extra, search.size))
    scores, idx = scores[0], idx[0]
    if exclude is not None:
        keep = idx != exclude
        scores, idx = scores[keep], idx[keep]
    return scores[:k], idx[:k]
