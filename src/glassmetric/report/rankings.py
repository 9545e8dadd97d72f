"""One query's structural re-ranking, as ``glassmetric eval --rerank structural --k K`` ranks it.

:func:`rerank_query` is :meth:`glassmetric.Retriever.rerank` for a single query: its global
top-``K`` re-sorted by the multi-scale score ``cos + SS`` (DIML, Zhao et al. 2021, Eq. 9), the
later positions in global order. A query that is itself gallery row ``exclude`` is left out of
its own results, as ``eval`` leaves each query of a folder out of its own ranking.
:func:`rank_moves` says how far each re-ranked result moved against the global ranking.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from glassmetric.retrieval.rerank import RerankResult
from glassmetric.retriever import Retriever
from glassmetric.retriever.embeddings import Embeddings

__all__ = ["as_embeddings", "rank_moves", "rerank_query"]


def as_embeddings(fields: Mapping[str, Tensor]) -> Embeddings:
    """``embed_fields``-style tensors (``embedding``, and ``local``, ``uncertainty`` when present)
    as :class:`Embeddings` (no copy)."""
    n = len(fields["embedding"])
    return Embeddings(
        embedding=fields["embedding"],
        local=fields.get("local"),
        uncertainty=fields.get("uncertainty"),
        labels=torch.zeros(n, dtype=torch.long),
        positions=torch.arange(n),
    )


def _cut(result: RerankResult, keep: int, exclude: int | None = None) -> RerankResult:
    """The first ``keep`` columns of ``result`` (one query), without gallery row ``exclude``."""
    mask = result.indices[0] != exclude if exclude is not None else torch.ones_like(result.indices[0], dtype=torch.bool)
    dropped = int((~mask[: result.k]).sum())
    cols = {
        name: getattr(result, name)[:, mask][:, :keep]
        for name in ("indices", "global_scores", "structural_scores", "scores")
    }
    return RerankResult(k=min(result.k - dropped, keep), **cols)


def rerank_query(
    retriever: Retriever,
    query: Embeddings,
    gallery: Embeddings,
    *,
    k: int,
    n: int,
    exclude: int | None = None,
    index=None,
) -> RerankResult:
    """The first ``n`` results of ``query`` (one row) after re-ranking its global top-``k`` in
    ``gallery`` (``k``, ``n`` capped at the rankable rows), leaving gallery row ``exclude`` out.

    ``index``: the :class:`~glassmetric.retrieval.index.GalleryIndex` that draws the shortlist
    (None: exact kNN). With ``exclude`` the shortlist is drawn one longer and the excluded row,
    which scores ``cos = 1`` with itself and is in it, dropped: the re-ranked order of the others
    is the one a search without that row gives (a stable sort keeps their relative order).
    """
    extra = int(exclude is not None)
    available = len(gallery) - extra
    k, n = min(k, available), min(n, available)
    cols = max(n, k)
    if exclude is None:
        return _cut(retriever.rerank(query, gallery, k=k, n_neighbours=cols, index=index), n)
    result = retriever.rerank(query, gallery, k=k + 1, n_neighbours=cols + 1, index=index)
    if not bool((result.indices[0, : k + 1] == exclude).any()):
        # more than k rows tie with the query at cos 1, so it is not in its own shortlist: draw the k
        result = retriever.rerank(query, gallery, k=k, n_neighbours=cols + 1, index=index)
    return _cut(result, n, exclude)


def rank_moves(reranked: Sequence[int], global_order: Sequence[int]) -> list[int | None]:
    """For each gallery row of ``reranked`` (best first), its global rank minus its re-ranked
    rank: positive moved up, negative down, None when it is not in ``global_order``."""
    global_rank = {row: r for r, row in enumerate(global_order)}
    return [None if row not in global_rank else global_rank[row] - r for r, row in enumerate(reranked)]
