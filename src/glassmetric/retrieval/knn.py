"""k-nearest-neighbour search by inner product, chunked over queries.

Embeddings in glassmetric are L2-normalised, so the inner product is the cosine similarity.
The torch and faiss backends are exact and never build the full ``Q x N`` score matrix:
queries are processed in chunks whose score buffer fits a memory budget
(:data:`SCORE_BUDGET_BYTES`). Both return the same neighbours; on the CPU faiss is the faster
one for large searches, so the default ``auto`` backend picks faiss there and torch on a GPU
and for small searches (:func:`auto_backend`). The ``index`` backend searches a
:class:`.index.GalleryIndex` (exact for small galleries, HNSW or IVF for large ones).

Tie-breaking is deterministic: among equal scores the lower gallery index comes first, both
inside the returned list and at its boundary (which of several tied items makes the cut).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "AUTO_FAISS_MIN_ITEMS",
    "SCORE_BUDGET_BYTES",
    "auto_backend",
    "default_chunk_rows",
    "iter_faiss_index",
    "iter_knn",
    "knn",
]

#: Upper bound on the float32 score buffer of one query chunk when ``chunk_size`` is None.
#: The working memory of a chunk is a small multiple of this (top-k buffers, tie masks).
SCORE_BUDGET_BYTES = 256 * 2**20

#: The ``auto`` backend searches CPU tensors with faiss when the query and the gallery both hold
#: at least this many items (and faiss is installed), else with torch: faiss was the faster at
#: 10,000 x 10,000, torch at 5,000 x 5,000 and for 500 queries against 1,000,000 items
#: (BENCHMARKS.md, "Exact kNN and retrieval metrics").
AUTO_FAISS_MIN_ITEMS = 8_000

_BACKENDS = ("auto", "torch", "faiss", "index")


def auto_backend(n_query: int, n_gallery: int, device: torch.device | str = "cpu") -> str:
    """The exact backend ``"auto"`` runs: ``"faiss"`` on the CPU when the query and the gallery
    both hold :data:`AUTO_FAISS_MIN_ITEMS` items or more, ``"torch"`` otherwise (and on a GPU)."""
    if torch.device(device).type != "cpu" or min(n_query, n_gallery) < AUTO_FAISS_MIN_ITEMS:
        return "torch"
    try:
        import_faiss()
    except ImportError:
        return "torch"
    return "faiss"


def default_chunk_rows(gallery_size: int, budget_bytes: int | None = None) -> int:
    """Number of query rows whose float32 scores against the gallery fit ``budget_bytes``."""
    budget = SCORE_BUDGET_BYTES if budget_bytes is None else budget_bytes
    return max(1, budget // (4 * max(1, gallery_size)))


def import_faiss():
    """Import faiss, or raise an ImportError (a MissingDependencyError) that names the extra to install."""
    from glassmetric.extras import require

    return require("faiss", "faiss", "the faiss kNN backend and gallery index", "faiss-cpu (or a conda faiss)")


def knn(
    query: Tensor,
    gallery: Tensor,
    k: int,
    *,
    exclude_self: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
    index=None,
) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` gallery items of each query by inner product.

    Args:
        query: ``(Q, D)`` embeddings, float32 or float16 (scores are computed in float32).
        gallery: ``(N, D)`` embeddings on the same device as ``query``.
        k: number of neighbours, ``1 <= k <= N`` (``N - 1`` with ``exclude_self``).
        exclude_self: query ``i`` is gallery item ``i`` (the same set) and is never returned
            as its own neighbour. Its diagonal score is masked, so duplicates of it are still
            found.
        chunk_size: queries per chunk; None picks it from :data:`SCORE_BUDGET_BYTES`.
        backend: ``"auto"`` (default: ``"torch"`` or ``"faiss"`` by device and size, see
            :func:`auto_backend`), ``"torch"`` (on the inputs' device), ``"faiss"``
            (``IndexFlatIP`` on CPU, needs ``faiss-cpu``) or ``"index"``: the
            :class:`.index.GalleryIndex` ``index`` built over ``gallery`` (required; exact below
            its size threshold, approximate above it, where some slots may hold index -1).

    Returns:
        ``(similarities, indices)``, both ``(Q, k)`` on the inputs' device: float32 scores in
        descending order and int64 gallery indices; equal scores are ordered by ascending
        index, and of several items tied at the k-th score the lowest indices are kept (every
        backend but ``"index"``, which orders ties inside its list the same way).
    """
    sims, idx = [], []
    for _, s, i in iter_knn(
        query, gallery, k, exclude_self=exclude_self, chunk_size=chunk_size, backend=backend, index=index
    ):
        sims.append(s)
        idx.append(i)
    if not sims:
        device = query.device
        return (
            torch.empty(0, k, dtype=torch.float32, device=device),
            torch.empty(0, k, dtype=torch.long, device=device),
        )
    return torch.cat(sims), torch.cat(idx)


def iter_knn(
    query: Tensor,
    gallery: Tensor,
    k: int,
    *,
    exclude_self: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
    index=None,
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Like :func:`knn`, but yield ``(start, similarities, indices)`` per chunk of queries.

    Rows ``start : start + len(indices)`` of the query are covered by each chunk, so callers
    can reduce the neighbour lists chunk by chunk without holding all ``Q x k`` of them.
    """
    query, gallery = _check_inputs(query, gallery, k, exclude_self, chunk_size, backend)
    if backend == "auto":
        backend = auto_backend(len(query), len(gallery), query.device)
    rows = chunk_size if chunk_size is not None else default_chunk_rows(len(gallery))
    if backend == "index":
        if index is None:
            raise ValueError(
                "backend='index' searches a GalleryIndex built over the gallery: pass it as index= "
                "(glassmetric.retrieval.index.GalleryIndex.build(gallery))"
            )
        index.check_fits(gallery)
        yield from iter_faiss_index(index.faiss_index, query, k, exclude_self=exclude_self, rows=rows)
    elif backend == "faiss":
        yield from _iter_faiss(query, gallery, k, exclude_self, rows)
    else:
        yield from _iter_torch(query, gallery, k, exclude_self, rows)


def _check_inputs(query, gallery, k, exclude_self, chunk_size, backend) -> tuple[Tensor, Tensor]:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    query, gallery = torch.as_tensor(query), torch.as_tensor(gallery)
    if query.ndim != 2 or gallery.ndim != 2:
        raise ValueError(
            f"query and gallery must be 2-D (n, dim), got shapes {tuple(query.shape)} and {tuple(gallery.shape)}"
        )
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query dim {query.shape[1]} does not match gallery dim {gallery.shape[1]}")
    if query.device != gallery.device:
        raise ValueError(f"query is on {query.device} but gallery is on {gallery.device}")
    if not (query.is_floating_point() and gallery.is_floating_point()):
        raise ValueError(f"embeddings must be floating point, got {query.dtype} and {gallery.dtype}")
    if exclude_self and query.shape[0] != gallery.shape[0]:
        raise ValueError(
            "exclude_self=True needs query and gallery to be the same set, got "
            f"{query.shape[0]} queries and {gallery.shape[0]} gallery items"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    available = gallery.shape[0] - int(exclude_self)
    if k > available:
        extra = " minus the query itself" if exclude_self else ""
        raise ValueError(
            f"k={k} is larger than the {available} neighbours available (gallery size {gallery.shape[0]}{extra})"
        )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if not (torch.isfinite(query).all() and torch.isfinite(gallery).all()):
        raise ValueError("embeddings contain NaN or infinite values")
    return query, gallery


@torch.no_grad()
def _iter_torch(query, gallery, k, exclude_self, rows, self_rows=None):
    """Chunks of the exact torch search. ``self_rows``: gallery index of each query to leave
    out (default with ``exclude_self``: query ``i`` is gallery item ``i``)."""
    gallery = gallery.float().contiguous()
    n = gallery.shape[0]
    if exclude_self and self_rows is None:
        self_rows = torch.arange(query.shape[0], device=gallery.device)
    for start in range(0, query.shape[0], rows):
        q = query[start : start + rows].float()
        scores = q @ gallery.T
        if self_rows is not None:
            scores[torch.arange(q.shape[0], device=scores.device), self_rows[start : start + rows]] = float("-inf")
        sims, idx = _topk_lowest_index(scores, k, n)
        del scores
        yield start, sims, idx


def _topk_lowest_index(scores: Tensor, k: int, n: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row with ties broken by lower column index (exact, O(n) per row)."""
    vals, idx = scores.topk(min(k + 1, n), dim=1)
    if k < n:
        # torch.topk picks arbitrarily among items tied at the k-th score. A row has such a
        # boundary tie iff its (k+1)-th largest score equals its k-th; redo those rows:
        # keep everything above the k-th score, then the lowest-index items equal to it.
        tied = (vals[:, k - 1] == vals[:, k]).nonzero().squeeze(1)
        vals, idx = vals[:, :k], idx[:, :k]
        if tied.numel():
            sub = scores[tied]
            kth = vals[tied, k - 1 :]
            above = sub > kth
            equal = sub == kth
            need = k - above.sum(1, keepdim=True, dtype=torch.int32)
            take = above | (equal & (equal.cumsum(1, dtype=torch.int32) <= need))
            sub_idx = take.nonzero()[:, 1].view(-1, k)  # row-major: ascending per row
            vals[tied] = sub.gather(1, sub_idx)
            idx[tied] = sub_idx
    return _order_ties(vals, idx)


def _order_ties(vals: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by descending score, then ascending index."""
    idx, order = idx.sort(dim=1)
    vals = vals.gather(1, order)
    vals, order = vals.sort(dim=1, descending=True, stable=True)
    return vals, idx.gather(1, order)


def _iter_faiss(query, gallery, k, exclude_self, rows):
    """faiss ``IndexFlatIP`` search, exact, with the tie order of the torch search.

    faiss keeps an arbitrary subset of the items tied at the k-th score. One more neighbour is
    searched than asked for: a row whose k-th and (k+1)-th scores are equal has such a boundary
    tie and is searched again with the torch search, which keeps the lowest indices.
    """
    faiss = import_faiss()
    gallery = gallery.float().contiguous()
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery.detach().cpu().numpy()))
    n = gallery.shape[0]
    depth = k + 1 if k < n - int(exclude_self) else k
    for start, sims, idx in iter_faiss_index(index, query, depth, exclude_self=exclude_self, rows=rows):
        if depth > k:
            tied = (sims[:, k - 1] == sims[:, k]).nonzero().squeeze(1)
            sims, idx = sims[:, :k].contiguous(), idx[:, :k].contiguous()
            self_rows = start + tied if exclude_self else None
            for t0, t_sims, t_idx in _iter_torch(query[start + tied], gallery, k, False, rows, self_rows):
                sims[tied[t0 : t0 + len(t_idx)]] = t_sims
                idx[tied[t0 : t0 + len(t_idx)]] = t_idx
        yield start, sims, idx


def iter_faiss_index(index, query: Tensor, k: int, *, exclude_self: bool = False, rows: int | None = None):
    """Search a faiss index by chunks of ``rows`` queries: yield ``(start, similarities, indices)``
    on the query's device, ties ordered by ascending index.

    With ``exclude_self`` (query ``i`` is indexed item ``i``) the query is removed from its own
    results. An approximate index may find fewer than ``k`` items: those slots hold index -1
    and score ``-inf``.
    """
    device = query.device
    q = np.ascontiguousarray(query.detach().float().cpu().numpy())
    k_search = k + int(exclude_self)
    rows = rows or default_chunk_rows(index.ntotal)
    for start in range(0, q.shape[0], rows):
        sims, idx = index.search(q[start : start + rows], k_search)
        if exclude_self:
            # Remove the query itself wherever it is ranked (with duplicates it need not be
            # first); where ties pushed it out of the k+1 results, drop the last one instead.
            is_self = idx == np.arange(start, start + len(idx))[:, None]
            is_self[~is_self.any(1), -1] = True
            sims = sims[~is_self].reshape(-1, k)
            idx = idx[~is_self].reshape(-1, k)
        vals = torch.from_numpy(np.where(idx < 0, -np.inf, sims).astype(np.float32))
        ids = torch.from_numpy(idx).long()
        # faiss returns scores in descending order: only rows with equal neighbours need sorting
        tied = (vals[:, 1:] == vals[:, :-1]).any(1).nonzero().squeeze(1)
        if tied.numel():
            vals[tied], ids[tied] = _order_ties(vals[tied], ids[tied])
        yield start, vals.to(device), ids.to(device)
