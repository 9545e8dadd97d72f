"""Structural re-ranking of a global shortlist (DIML, Zhao et al. ICCV 2021, Sec. 3.3).

Retrieval first ranks the gallery by the cosine of the global embeddings (exact kNN, see
:mod:`.knn`); the top ``K`` candidates of each query are then re-scored by the multi-scale score

    s(x, y) = cos(g_x, g_y) + SS(x, y)

(:func:`glassmetric.similarity.structural.multiscale_score`: optimal transport between the
``N = g*g`` local embeddings of the two images) and re-sorted by it. Positions after ``K`` keep
the global order, so ``K = 0`` is plain global retrieval and ``K`` = the gallery size is a full
structural ranking.

Batched and memory-bounded: the ``K`` candidates of a chunk of queries are re-scored at once,
one ``(chunk, K)`` block of OT problems
(:func:`glassmetric.similarity.structural.structural_similarity` with query ``(c, N, D)``
against candidates ``(c, K, N, D)``); the only Python loop is over query chunks. On the usual
path (one float dtype, ``2 / epsilon <= 50`` in float32) the candidates of each query are
gathered into one reused buffer and a single matrix product with ``[x_local; g_x]`` gives S,
both marginals' correlations and the cosines
(:func:`glassmetric.similarity.structural._gathered_block_scores`: a loop over the queries of
a chunk for the gather and the product only; the OT problems of the chunk are still solved in
one batched call).

Ordering: the re-ranked candidates are sorted by descending multi-scale score with a stable
sort, so candidates with equal scores keep their global order (which breaks its own ties
towards the lower gallery index).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from glassmetric.similarity import lane_sinkhorn
from glassmetric.similarity.structural import (
    MarginalKind,
    _gathered_block_scores,
    _product_group,
    _structural_similarity,
    global_similarity,
    pooled_cells,
)

from .knn import knn
from .metrics import (
    RANKING_METRICS,
    _check_recall_ks,
    _classes_and_r,
    _labels,
    check_shared_classes,
    ranking_metrics,
)

__all__ = [
    "DEFAULT_SWEEP_KS",
    "RERANK_BUDGET_BYTES",
    "RERANK_BUDGET_BYTES_CPU",
    "RerankResult",
    "default_rerank_chunk_rows",
    "rerank_sweep",
    "structural_rerank",
]

#: The shortlist sizes of the DIML re-ranking sweep.
DEFAULT_SWEEP_KS = (0, 5, 10, 50, 100, 500, 1000)

#: Rough bound on the working memory of one chunk of re-scored queries when ``chunk_size`` is
#: None (gathered candidate embeddings plus the Sinkhorn buffers, see
#: :func:`default_rerank_chunk_rows`). On the CPU a chunk that stays near the caches is faster
#: (bench/structural.py: 1.0-1.8x over 256 MiB chunks); a GPU wants large batches.
RERANK_BUDGET_BYTES = 256 * 2**20
RERANK_BUDGET_BYTES_CPU = 32 * 2**20


@dataclass
class RerankResult:
    """Re-ranked neighbours of every query; all fields ``(Q, n)``, best first.

    The first ``k`` columns are the re-ranked shortlist; columns ``k .. n - 1`` (present when
    ``n_neighbours > k``) keep the global order, and their ``structural_scores`` and ``scores``
    are NaN (not re-scored).
    """

    indices: Tensor  #: (Q, n) int64 gallery indices
    global_scores: Tensor  #: (Q, n) cos(g_x, g_y)
    structural_scores: Tensor  #: (Q, n) SS (NaN after the first k columns)
    scores: Tensor  #: (Q, n) multi-scale score global + SS, the sort key (NaN after k)
    k: int  #: number of re-ranked candidates per query


def default_rerank_chunk_rows(
    k: int,
    n_cells: int,
    dim: int,
    budget_bytes: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> int:
    """Queries per chunk so one chunk's ``k`` candidates fit ``budget_bytes``.

    On accelerators a query costs about ``4 k N (D + 8 N)`` bytes: its gathered candidate
    local embeddings (``k N D`` floats) and the Sinkhorn working set (about eight ``k N N``
    float buffers: the product holding S, the kernel and its transpose, the plan, temporaries).
    On the CPU the candidates are gathered one query at a time into one reused buffer
    (:func:`glassmetric.similarity.structural._gathered_block_scores`), so a query costs the
    torch solver's working set only, ``4 k N (8 N)`` bytes (``bench/structural.py``: 1.0-1.2x
    over chunks sized with the gathered embeddings counted); with the native lane kernel
    (float32, :func:`glassmetric.similarity.lane_sinkhorn.available`), which works in per-block
    buffers, only the product holding S, ``4 k (N + 1)^2`` bytes: larger chunks give its
    threads more blocks to balance (1.1-1.25x at 7x7 on 2 threads).
    """
    is_cpu = torch.device(device).type == "cpu"
    if budget_bytes is None:
        budget_bytes = RERANK_BUDGET_BYTES_CPU if is_cpu else RERANK_BUDGET_BYTES
    if lane_sinkhorn.applies(dtype, device):
        per_query = 4 * max(1, k) * (n_cells + 1) ** 2
    else:
        per_query = 4 * max(1, k) * n_cells * ((0 if is_cpu else dim) + 8 * n_cells)
    return max(1, budget_bytes // per_query)


def structural_rerank(
    query_global: Tensor,
    query_local: Tensor,
    gallery_global: Tensor | None = None,
    gallery_local: Tensor | None = None,
    *,
    k: int = 100,
    n_neighbours: int | None = None,
    exclude_self: bool | None = None,
    chunk_size: int | None = None,
    knn_chunk_size: int | None = None,
    epsilon: float = 0.05,
    iters: int = 100,
    tol: float | None = None,
    marginals: MarginalKind = "cross_correlation",
    index=None,
) -> RerankResult:
    """Global top-``k`` shortlist re-ranked by the multi-scale score ``cos + SS``.

    Args:
        query_global, query_local: ``(Q, D)`` and ``(Q, N, D)`` L2-normalised embeddings.
        gallery_global, gallery_local: ``(G, D)`` and ``(G, N, D)``; both None searches the
            query set against itself, leaving each query out of its own neighbours.
        k: shortlist size, ``0 <= k <= A`` where ``A = G - exclude_self``; 0 re-ranks nothing.
        n_neighbours: columns to return, ``k <= n <= A``; default ``k``. Columns after ``k``
            are the rest of the global ranking.
        exclude_self: query ``i`` is gallery item ``i`` and is never its own neighbour;
            default True when the gallery is None, else False.
        chunk_size: queries re-scored per batched call; None picks it from
            :data:`RERANK_BUDGET_BYTES` (:func:`default_rerank_chunk_rows`). The result does
            not depend on it.
        knn_chunk_size: queries per chunk of the global kNN (see :func:`.knn.knn`).
        epsilon, iters, tol, marginals: of the OT problem, see
            :func:`glassmetric.similarity.structural.structural_similarity`.
        index: a :class:`.index.GalleryIndex` over ``gallery_global`` that draws the shortlist
            (an approximate one for large galleries); None: exact kNN.

    The re-scored global term is recomputed from the embeddings in their own precision, so the
    scores are exactly the block form of ``multiscale_score``; the global kNN that draws the
    shortlist scores in float32. Runs without autograd on the inputs' device.
    """
    qg, ql, gg, gl, exclude_self = _check_inputs(query_global, query_local, gallery_global, gallery_local, exclude_self)
    available = len(gg) - int(exclude_self)
    k = _check_count("k", k, 0, available)
    n = k if n_neighbours is None else _check_count("n_neighbours", n_neighbours, k, available)
    if chunk_size is not None:
        _check_count("chunk_size", chunk_size, 1, None)
    dtype = _score_dtype(qg, gg)
    if n == 0:
        empty = torch.empty(len(qg), 0, dtype=dtype, device=qg.device)
        return RerankResult(empty.long(), empty, empty.clone(), empty.clone(), 0)

    sims, idx = _shortlist(qg, gg, n, exclude_self, knn_chunk_size, index)
    gs_short, ss_short = _rescore(
        qg,
        ql,
        gg,
        gl,
        idx[:, :k],
        chunk_size,
        {"epsilon": epsilon, "iters": iters, "tol": tol, "marginals": marginals},
    )
    scores_short = gs_short + ss_short
    order = _stable_descending(scores_short)
    nan_tail = torch.full((len(qg), n - k), float("nan"), dtype=dtype, device=qg.device)
    return RerankResult(
        indices=torch.cat([idx[:, :k].gather(1, order), idx[:, k:]], 1),
        global_scores=torch.cat([gs_short.gather(1, order), sims[:, k:].to(dtype)], 1),
        structural_scores=torch.cat([ss_short.gather(1, order), nan_tail], 1),
        scores=torch.cat([scores_short.gather(1, order), nan_tail.clone()], 1),
        k=k,
    )


def rerank_sweep(
    query_global: Tensor,
    query_local: Tensor,
    gallery_global: Tensor | None = None,
    gallery_local: Tensor | None = None,
    *,
    query_labels: Tensor,
    gallery_labels: Tensor | None = None,
    ks: Sequence[int] = DEFAULT_SWEEP_KS,
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    include: Iterable[str] = RANKING_METRICS,
    exclude_self: bool | None = None,
    chunk_size: int | None = None,
    knn_chunk_size: int | None = None,
    epsilon: float = 0.05,
    iters: int = 100,
    tol: float | None = None,
    marginals: MarginalKind = "cross_correlation",
    index=None,
) -> dict[int, dict[str, float]]:
    """Recall@K, R-Precision and MAP@R after re-ranking the top ``K`` for each ``K`` in ``ks``.

    The multi-scale scores are computed ONCE, for the largest shortlist
    ``K_max = min(max(ks), A)`` (``A = G - exclude_self``, the number of rankable gallery
    items); then for each ``K`` the top ``min(K, A)`` of the global ranking are re-sorted by
    their scores and every later position keeps the global order. The metrics
    (:func:`.metrics.ranking_metrics`) read the first ``max(R, max(recall_ks))`` positions
    (capped at ``A``), which may reach past ``K``. ``K = 0`` gives exactly the global metrics of
    :func:`.metrics.retrieval_metrics`; a ``K >= A`` is a full structural ranking.

    Args:
        query_global, query_local, gallery_global, gallery_local, exclude_self, chunk_size,
        knn_chunk_size, epsilon, iters, tol, marginals, index: as for :func:`structural_rerank`
            (gallery None: the query set against itself).
        query_labels, gallery_labels: ``(Q,)`` and ``(G,)`` integer labels (gallery labels
            must be None exactly when the gallery is).
        ks: shortlist sizes, non-negative integers.
        recall_ks, include: as for :func:`.metrics.ranking_metrics`.

    Returns:
        ``{K: {"recall@1": ..., "r_precision": ..., "map_at_r": ...}}`` keyed by the requested
        ``K``, in the order of ``ks``.

    Memory: the global ranking ``(Q, L)`` (``L`` the positions read) and the ``(Q, K_max)``
    scores are kept whole; the structural scores are computed in chunks of queries.
    """
    if (gallery_global is None) != (gallery_labels is None):
        raise ValueError("gallery_labels must be given exactly when the gallery is")
    qg, ql, gg, gl, exclude_self = _check_inputs(query_global, query_local, gallery_global, gallery_local, exclude_self)
    if gallery_labels is None:
        gallery_labels = query_labels
    else:
        check_shared_classes(query_labels, gallery_labels)
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must hold at least one shortlist size")
    for K in ks:
        _check_count("ks", K, 0, None)
    if chunk_size is not None:
        _check_count("chunk_size", chunk_size, 1, None)
    include = tuple(include)
    unknown = sorted(set(include) - set(RANKING_METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {RANKING_METRICS}")
    recall_ks = _check_recall_ks(recall_ks)
    cutoffs = recall_ks if "recall" in include else ()
    needs_r = any(m in include for m in ("r_precision", "map_at_r"))

    device = qg.device
    q_lab = _labels(query_labels, len(qg), "query", device)
    g_lab = _labels(gallery_labels, len(gg), "gallery", device)
    _, _, r = _classes_and_r(q_lab, g_lab, exclude_self)
    valid = r > 0
    available = len(gg) - int(exclude_self)
    k_max = min(max(ks), available)
    r_max = int(r[valid].max()) if needs_r and bool(valid.any()) else 0
    depth = min(max(k_max, max(cutoffs, default=0), r_max), available)

    metric_kw: dict[str, Any] = {"recall_ks": recall_ks, "include": include, "exclude_self": exclude_self}
    if depth == 0:  # no rankable gallery item: every query is lone
        idx = torch.empty(len(qg), 0, dtype=torch.long, device=device)
        metrics = ranking_metrics(idx, q_lab, g_lab, **metric_kw)
        return {K: dict(metrics) for K in ks}

    _, idx = _shortlist(qg, gg, depth, exclude_self, knn_chunk_size, index)
    gs, ss = _rescore(
        qg,
        ql,
        gg,
        gl,
        idx[:, :k_max],
        chunk_size,
        {"epsilon": epsilon, "iters": iters, "tol": tol, "marginals": marginals},
    )
    scores = gs + ss
    del gs, ss
    out: dict[int, dict[str, float]] = {}
    for K in ks:
        kk = min(K, available)
        ranked = idx
        if kk > 0:
            order = _stable_descending(scores[:, :kk])
            ranked = torch.cat([idx[:, :kk].gather(1, order), idx[:, kk:]], 1)
        out[K] = ranking_metrics(ranked, q_lab, g_lab, **metric_kw)
    return out


# --------------------------------------------------------------------------------------------


def _shortlist(qg, gg, n: int, exclude_self: bool, chunk_size, index) -> tuple[Tensor, Tensor]:
    """The global top-``n``: exact kNN, or the gallery ``index``'s (which must fill every slot)."""
    if index is None:
        return knn(qg, gg, n, exclude_self=exclude_self, chunk_size=chunk_size)
    sims, idx = knn(qg, gg, n, exclude_self=exclude_self, chunk_size=chunk_size, backend="index", index=index)
    if bool((idx < 0).any()):
        raise ValueError(
            f"the {index.kind} gallery index found fewer than {n} neighbours for some queries: "
            "search wider (eval.index.nprobe, eval.index.ef_search) or shorten the shortlist"
        )
    return sims, idx


def _stable_descending(scores: Tensor) -> Tensor:
    """Column order sorting each row by descending score; equal scores keep their order."""
    return scores.sort(dim=1, descending=True, stable=True).indices


@torch.no_grad()
def _rescore(qg, ql, gg, gl, idx: Tensor, chunk_size: int | None, kw: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """``(cos, SS)`` of each query with its candidates ``idx (Q, K)``, chunked over queries."""
    q, k = idx.shape
    dtype = _score_dtype(qg, gg)
    if k == 0 or q == 0:
        empty = torch.empty(q, k, dtype=dtype, device=qg.device)
        return empty, empty.clone()
    if kw.get("marginals") == "pooled_cross_correlation":
        # cross-correlation against each image's mean cell: the same fast path with those in
        # place of the globals (the cosines it returns are then theirs), and the global cosines
        # of the candidates apart
        _, pooled_ss = _rescore(
            pooled_cells(ql).to(ql.dtype),
            ql,
            _candidate_pooled_cells(gl, idx),
            gl,
            idx,
            chunk_size,
            {**kw, "marginals": "cross_correlation"},
        )
        return _candidate_cosines(qg, gg, idx).to(dtype), pooled_ss
    rows = chunk_size or default_rerank_chunk_rows(k, ql.shape[1], ql.shape[2], device=ql.device, dtype=dtype)
    gs: list[Tensor] = []
    ss: list[Tensor] = []
    # fast path: per query, one gather of its candidates into a cached buffer and one product
    # for S, both marginals' correlations and the cosines
    group = _product_group(min(rows, q))  # queries per batched product
    buf = torch.empty(group * (k * gl.shape[1] + k), gl.shape[2], dtype=gl.dtype, device=gl.device)
    for start in range(0, q, rows):
        sl = slice(start, start + rows)
        out = _gathered_block_scores(ql[sl], qg[sl], gl, gg, idx[sl], buffer=buf, **kw)
        if out is None:  # not applicable (mixed dtypes, small epsilon): the general path
            break
        gs.append(out[0])
        ss.append(out[1])
    else:
        return torch.cat(gs).to(dtype), torch.cat(ss).to(dtype)
    gs, ss = [], []
    # one buffer for the gathered candidate locals of the largest chunk, filled by
    # index_select (much faster than advanced indexing on CPU); _structural_similarity keeps no
    # reference to it, so every chunk reuses it
    n_cells, dim = gl.shape[1:]
    buf = torch.empty(min(rows, q) * k, n_cells, dim, dtype=gl.dtype, device=gl.device)
    for start in range(0, q, rows):
        c_idx = idx[start : start + rows]  # (c, K)
        c = len(c_idx)
        flat = c_idx.reshape(-1)
        cand_l = torch.index_select(gl, 0, flat, out=buf[: c * k]).view(c, k, n_cells, dim)
        cand_g = torch.index_select(gg, 0, flat).view(c, k, dim)  # (c, K, D)
        q_g = qg[start : start + rows]  # (c, D)
        ss.append(
            _structural_similarity(ql[start : start + rows], cand_l, q_g, cand_g, gradient="none_through_plan", **kw)
        )
        gs.append(global_similarity(q_g, cand_g))
    return torch.cat(gs).to(dtype), torch.cat(ss).to(dtype)


def _candidate_pooled_cells(gl: Tensor, idx: Tensor, budget_bytes: int = 64 * 2**20) -> Tensor:
    """``(G, D)``: :func:`pooled_cells` of the gallery items in ``idx``, zeros elsewhere (a
    search scores a few candidates of a large gallery: only those are read)."""
    ref = gl.new_zeros(gl.shape[0], gl.shape[-1])
    items = idx.unique()
    rows = max(1, budget_bytes // max(1, gl[0].numel() * gl.element_size()))
    for s in range(0, len(items), rows):
        sel = items[s : s + rows]
        ref[sel] = pooled_cells(gl[sel]).to(gl.dtype)
    return ref


def _candidate_cosines(qg: Tensor, gg: Tensor, idx: Tensor, budget_bytes: int = 64 * 2**20) -> Tensor:
    """``cos(qg[q], gg[idx[q, j]])`` ``(Q, K)``, gathering at most ``budget_bytes`` of candidates
    at a time."""
    q, k = idx.shape
    rows = max(1, budget_bytes // max(1, 4 * k * gg.shape[-1]))
    return torch.cat([global_similarity(qg[s : s + rows], gg[idx[s : s + rows]]) for s in range(0, q, rows)])


def _score_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_inputs(qg, ql, gg, gl, exclude_self):
    if (gg is None) != (gl is None):
        raise ValueError("give both gallery_global and gallery_local, or neither")
    if gg is None:
        gg, gl = qg, ql
        exclude_self = True if exclude_self is None else exclude_self
        if not exclude_self:
            raise ValueError("exclude_self=False needs an explicit gallery")
    elif exclude_self is None:
        exclude_self = False
    qg, ql, gg, gl = (torch.as_tensor(t) for t in (qg, ql, gg, gl))
    for name, t, nd in (
        ("query_global", qg, 2),
        ("query_local", ql, 3),
        ("gallery_global", gg, 2),
        ("gallery_local", gl, 3),
    ):
        if t.ndim != nd:
            raise ValueError(f"{name} must be {nd}-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        if t.device != qg.device:
            raise ValueError(f"{name} is on {t.device} but query_global is on {qg.device}")
    if len(ql) != len(qg) or len(gl) != len(gg):
        raise ValueError(
            f"global and local embeddings disagree on the number of images: query "
            f"{len(qg)} vs {len(ql)}, gallery {len(gg)} vs {len(gl)}"
        )
    if ql.shape[1] != gl.shape[1]:
        raise ValueError(f"query and gallery have {ql.shape[1]} and {gl.shape[1]} cells")
    dims = {qg.shape[1], ql.shape[2], gg.shape[1], gl.shape[2]}
    if len(dims) != 1:
        raise ValueError(
            f"embedding sizes differ: query global {qg.shape[1]}, local {ql.shape[2]}, "
            f"gallery global {gg.shape[1]}, local {gl.shape[2]}"
        )
    if exclude_self and len(qg) != len(gg):
        raise ValueError(
            "exclude_self=True needs query and gallery to be the same set, got "
            f"{len(qg)} queries and {len(gg)} gallery items"
        )
    return qg, ql, gg, gl, bool(exclude_self)


def _check_count(name: str, value, low: int, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return int(value)
