"""Retrieval metrics of deep metric learning, as Musgrave et al. 2020 define them.

"A Metric Learning Reality Check" (ECCV 2020) defines R-Precision and MAP@R; Recall@K is the
metric of the DML literature (a query counts as correct if any of its K nearest neighbours
shares its class), as DIML, DGML and IDML report it. NMI clusters the query embeddings.

Conventions follow pytorch-metric-learning's ``AccuracyCalculator`` so the numbers are equal:

* Same-set mode (``gallery is None``): every query is searched against all other items; R is
  the number of *other* items of its class. Queries whose class has no other member ("lone"
  queries) are left out of Recall@K, R-Precision and MAP@R (AccuracyCalculator's
  ``not_lone_query_mask``); NMI uses every query.
* Query/gallery mode: R is the number of gallery items of the query's class. Queries with
  R = 0 are lone and are left out of Recall@K, R-Precision and MAP@R likewise (they are not
  counted as misses), with an :class:`UnmatchedQueryWarning` that counts them; when no query
  has a class the gallery holds, a DataError (:func:`check_shared_classes`).
* A metric over zero non-lone queries is NaN.
* Ties in similarity are broken towards the lower gallery index (see :mod:`.knn`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch import Tensor

from glassmetric.errors import DataError

from .knn import import_faiss, iter_knn

__all__ = [
    "METRICS",
    "RANKING_METRICS",
    "KMeansSizeWarning",
    "KnnDepthWarning",
    "UnmatchedQueryWarning",
    "check_shared_classes",
    "format_metrics_table",
    "ranking_metrics",
    "recall_ks_for",
    "retrieval_metrics",
]

#: Metric groups that :func:`retrieval_metrics` can compute, in output order.
METRICS = ("recall", "nmi", "r_precision", "map_at_r")
#: The groups :func:`ranking_metrics` computes from a given ranking (all but NMI).
RANKING_METRICS = ("recall", "r_precision", "map_at_r")

_NMI_BACKENDS = ("auto", "faiss", "sklearn")
#: AccuracyCalculator's default k-means: ``FaissKMeans(niter=20)``; faiss' default seed is 1234.
_FAISS_KMEANS_NITER = 20
#: faiss warns (on stderr, from C++) below this many points per centroid; glassmetric warns instead
_FAISS_MIN_POINTS_PER_CENTROID = 39
_SKLEARN_KMEANS_N_INIT = 10


def recall_ks_for(dataset_name: str) -> tuple[int, ...]:
    """The Recall@K cut-offs the literature reports for a data set."""
    return (1, 10, 100, 1000) if dataset_name.lower() == "sop" else (1, 2, 4, 8)


def retrieval_metrics(
    query: Tensor,
    query_labels: Tensor,
    gallery: Tensor | None = None,
    gallery_labels: Tensor | None = None,
    *,
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    include: Iterable[str] = METRICS,
    knn_backend: str = "auto",
    knn_index=None,
    nmi_backend: str = "auto",
    chunk_size: int | None = None,
    seed: int = 0,
    max_k: int | None = None,
) -> dict[str, float]:
    """Recall@K, NMI, R-Precision and MAP@R of a retrieval problem.

    Args:
        query: ``(Q, D)`` L2-normalised embeddings (similarity is the inner product).
        query_labels: ``(Q,)`` integer class labels.
        gallery, gallery_labels: ``(N, D)`` and ``(N,)``; None searches the query set
            against itself, leaving each query out of its own neighbours and of its R.
        recall_ks: cut-offs K of ``recall@K``; a K beyond the gallery means the whole
            gallery.
        include: subset of :data:`METRICS`.
        knn_backend: ``"auto"`` (default: exact, faiss for large CPU searches, torch
            otherwise), ``"torch"``, ``"faiss"`` or ``"index"``, see :func:`.knn.knn`.
        knn_index: for ``"index"``: a :class:`.index.GalleryIndex` over the gallery (None:
            one built with the default settings).
        nmi_backend: ``"faiss"`` (faiss k-means with 20 iterations, as AccuracyCalculator
            runs it), ``"sklearn"`` (``KMeans(n_init=10)``; its NMI may differ slightly from
            AccuracyCalculator's) or ``"auto"`` (default: faiss when installed, else sklearn).
        chunk_size: queries per kNN chunk; None picks it from a memory budget.
        seed: k-means seed. AccuracyCalculator's default k-means uses faiss' default seed
            1234; pass ``seed=1234`` to reproduce its NMI exactly.
        max_k: at most this many neighbours per query, but never fewer than the largest
            Recall@K cut-off (None: as many as the metrics need, so they are exact). Below the largest R, R-Precision and MAP@R only count the
            first ``max_k`` ranks and come out too low: a :class:`KnnDepthWarning` says so.

    Returns:
        Plain floats keyed ``recall@K`` (one per K), ``nmi``, ``r_precision`` and
        ``map_at_r``, for the groups in ``include``.
    """
    include = tuple(include)
    unknown = sorted(set(include) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {METRICS}")
    if nmi_backend not in _NMI_BACKENDS:
        raise ValueError(f"nmi_backend must be one of {_NMI_BACKENDS}, got {nmi_backend!r}")
    recall_ks = _check_recall_ks(recall_ks) if "recall" in include else ()

    same_set = gallery is None
    if same_set:
        if gallery_labels is not None:
            raise ValueError("gallery_labels given without gallery")
        gallery, gallery_labels = query, query_labels
    elif gallery_labels is None:
        raise ValueError("gallery given without gallery_labels")
    query, gallery = torch.as_tensor(query), torch.as_tensor(gallery)
    q_lab = _labels(query_labels, len(query), "query", query.device)
    g_lab = _labels(gallery_labels, len(gallery), "gallery", query.device)
    if not same_set:
        check_shared_classes(q_lab, g_lab)
    q_cls, g_cls, r = _classes_and_r(q_lab, g_lab, same_set)

    out: dict[str, float] = {}
    needs_r = [m for m in ("r_precision", "map_at_r") if m in include]
    if recall_ks or needs_r:
        out.update(
            _knn_metrics(
                query,
                gallery,
                q_cls,
                g_cls,
                r,
                same_set,
                recall_ks,
                needs_r,
                knn_backend,
                chunk_size,
                knn_index,
                max_k,
            )
        )
    if "nmi" in include:
        out["nmi"] = _nmi(query, q_lab, nmi_backend, seed)
    return _ordered(out, recall_ks)


def ranking_metrics(
    neighbour_indices: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    *,
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    include: Iterable[str] = RANKING_METRICS,
    exclude_self: bool = False,
    relevant_counts: Tensor | None = None,
) -> dict[str, float]:
    """Recall@K, R-Precision and MAP@R of a GIVEN ranking (e.g. a re-ranked neighbour list).

    The same definitions and conventions as :func:`retrieval_metrics` (which computes its
    numbers with the same code from its own kNN ranking), so a ranking equal to the kNN one
    gives identical values.

    Args:
        neighbour_indices: ``(Q, k)`` gallery indices, best first, one row per query. With
            ``exclude_self`` the rows must not contain the query itself. -1 marks an empty
            slot (an approximate index found fewer items): never relevant.
        query_labels: ``(Q,)`` integer class labels.
        gallery_labels: ``(G,)`` integer class labels (the query labels again in same-set mode).
        recall_ks: cut-offs K of ``recall@K``.
        include: subset of :data:`RANKING_METRICS`.
        exclude_self: same-set mode: query ``i`` is gallery item ``i``, and R (the number of
            relevant items) leaves it out.
        relevant_counts: ``(Q,)`` R of each query, overriding the count from the labels.
            Queries with R = 0 are lone and left out of every metric.

    Every row must hold enough of the ranking for the metrics to be exact: at least
    ``min(max(recall_ks), A)`` neighbours, and at least R for R-Precision / MAP@R, where
    ``A = G - exclude_self`` is the number of gallery items a query can be ranked against.

    Returns:
        Plain floats keyed ``recall@K`` (one per K), ``r_precision`` and ``map_at_r``, for
        the groups in ``include`` (NaN when every query is lone).
    """
    include = tuple(include)
    unknown = sorted(set(include) - set(RANKING_METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {RANKING_METRICS}")
    recall_ks = _check_recall_ks(recall_ks) if "recall" in include else ()
    needs_r = [m for m in ("r_precision", "map_at_r") if m in include]

    idx = torch.as_tensor(neighbour_indices)
    if idx.ndim != 2:
        raise ValueError(f"neighbour_indices must be (Q, k), got shape {tuple(idx.shape)}")
    if idx.is_floating_point() or idx.is_complex():
        raise ValueError(f"neighbour_indices must be integers, got {idx.dtype}")
    idx = idx.long()
    device = idx.device
    q_lab = _labels(query_labels, len(idx), "query", device)
    g_lab = torch.as_tensor(gallery_labels, device=device)
    if g_lab.ndim != 1:
        raise ValueError(f"gallery_labels must be 1-D, got shape {tuple(g_lab.shape)}")
    g_lab = _labels(g_lab, len(g_lab), "gallery", device)
    n_gallery = len(g_lab)
    if exclude_self and len(q_lab) != n_gallery:
        raise ValueError(
            "exclude_self=True needs query and gallery to be the same set, got "
            f"{len(q_lab)} queries and {n_gallery} gallery items"
        )
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= n_gallery):
        raise ValueError(f"neighbour_indices must lie in [0, {n_gallery}) or be -1 (an empty slot)")
    q_cls, g_cls, r = _classes_and_r(q_lab, g_lab, exclude_self)
    if relevant_counts is not None:
        r = _labels(relevant_counts, len(q_lab), "relevant_counts", device)
        if len(r) and int(r.min()) < 0:
            raise ValueError("relevant_counts must be non-negative")

    available = n_gallery - int(exclude_self)
    k = idx.shape[1]
    valid = r > 0
    if (recall_ks or needs_r) and bool(valid.any()):
        if recall_ks and k < min(max(recall_ks), available):
            raise ValueError(
                f"recall@{max(recall_ks)} needs {min(max(recall_ks), available)} neighbours per query, got {k}"
            )
        if needs_r and k < int(r[valid].max()):
            raise ValueError(
                f"R-Precision / MAP@R need R neighbours per query (R up to {int(r[valid].max())}), got {k}"
            )
    stats = _RankStats(len(q_lab), k, recall_ks, needs_r, device)
    if len(q_lab):
        stats.add(0, idx, q_cls, g_cls, r)
    return _ordered(stats.reduce(valid), recall_ks)


def _check_recall_ks(recall_ks: Sequence[int]) -> tuple[int, ...]:
    recall_ks = tuple(recall_ks)
    for k in recall_ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"recall_ks must be positive integers, got {k!r}")
    return recall_ks


def _classes_and_r(q_lab: Tensor, g_lab: Tensor, same_set: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Compact class ids over both sets, and R = relevant gallery items per query."""
    _, inverse = torch.unique(torch.cat([q_lab, g_lab]), return_inverse=True)
    q_cls, g_cls = inverse[: len(q_lab)], inverse[len(q_lab) :]
    class_size = torch.bincount(g_cls, minlength=int(inverse.max()) + 1 if len(inverse) else 0)
    r = class_size[q_cls] - int(same_set)
    return q_cls, g_cls, r


def _ordered(out: dict[str, float], recall_ks: Sequence[int]) -> dict[str, float]:
    order = [f"recall@{k}" for k in recall_ks] + ["nmi", "r_precision", "map_at_r"]
    return {key: float(out[key]) for key in order if key in out}


def _labels(labels, n: int, name: str, device) -> Tensor:
    labels = torch.as_tensor(labels, device=device)
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(
            f"{name}_labels must have shape ({n},) to match the {name} embeddings, got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name}_labels must be integers, got {labels.dtype}")
    return labels.long()


class UnmatchedQueryWarning(UserWarning):
    """Some queries have no gallery item of their class: the metrics leave them out."""


def check_shared_classes(query_labels: Tensor, gallery_labels: Tensor) -> None:
    """Query/gallery mode: a DataError when no query's class is in the gallery (every metric
    would be NaN), an :class:`UnmatchedQueryWarning` with the counts when some queries' are not."""
    q, g = torch.as_tensor(query_labels).cpu(), torch.as_tensor(gallery_labels).cpu()
    if not len(q):
        return
    matched = torch.isin(q, g)
    if bool(matched.all()):
        return
    q_classes, missing = torch.unique(q), torch.unique(q[~matched])
    if not bool(matched.any()):
        raise DataError(
            f"the queries and the gallery share no class: the {len(q)} queries are of {_some(q_classes)}, "
            f"the {len(g)} gallery items of {_some(torch.unique(g))}; Recall@K, R-Precision and MAP@R "
            "need queries whose class the gallery holds"
        )
    warnings.warn(
        f"{int((~matched).sum())} of {len(q)} queries have no gallery item of their class ({len(missing)} of "
        f"{len(q_classes)} query classes: {_some(missing, 'label')}): they are left out of Recall@K, R-Precision "
        f"and MAP@R, which cover the other {int(matched.sum())}",
        UnmatchedQueryWarning,
        stacklevel=3,
    )


def _some(labels: Tensor, noun: str = "class") -> str:
    """``"3 classes (labels 0, 4, 7)"``, at most 8 labels shown."""
    shown = ", ".join(str(int(v)) for v in labels[:8]) + (", ..." if len(labels) > 8 else "")
    if noun == "label":
        return f"label{'s' if len(labels) > 1 else ''} {shown}"
    return f"{len(labels)} class{'es' if len(labels) > 1 else ''} (label{'s' if len(labels) > 1 else ''} {shown})"


class KnnDepthWarning(UserWarning):
    """The kNN depth is below the largest class: R-Precision and MAP@R are too low."""


class KMeansSizeWarning(UserWarning):
    """NMI's faiss k-means has fewer points per centroid than faiss advises (small query sets)."""


def _knn_metrics(
    query, gallery, q_cls, g_cls, r, same_set, recall_ks, needs_r, backend, chunk_size, index=None, max_k=None
) -> dict[str, float]:
    """Recall@K, R-Precision and MAP@R from one chunked kNN pass over the queries."""
    valid = r > 0  # not lone
    if not bool(valid.any()):
        return _RankStats.all_nan(recall_ks, needs_r)
    available = len(gallery) - int(same_set)
    k_needed = max(max(recall_ks, default=0), int(r.max()) if needs_r else 0)
    k = min(k_needed, available)
    if max_k is not None:
        if isinstance(max_k, bool) or not isinstance(max_k, (int, np.integer)) or max_k < 1:
            raise ValueError(f"max_k must be a positive integer, got {max_k!r}")
        # Recall@K stays exact: the depth never drops below the largest cut-off
        k = max(min(k, int(max_k)), min(max(recall_ks, default=0), available))
        if needs_r and k < int(r.max()):
            warnings.warn(
                f"the kNN retrieves k={k} neighbours per query, fewer than the largest class "
                f"(R up to {int(r.max())}): R-Precision and MAP@R only count the first {k} ranks "
                "and are too low; raise eval.knn_k or leave it unset",
                KnnDepthWarning,
                stacklevel=3,
            )
    stats = _RankStats(len(query), k, recall_ks, needs_r, query.device)
    if backend == "index" and index is None:
        from .index import GalleryIndex

        index = GalleryIndex.build(gallery)
    chunks = iter_knn(query, gallery, k, exclude_self=same_set, chunk_size=chunk_size, backend=backend, index=index)
    for start, _, idx in chunks:
        stats.add(start, idx, q_cls, g_cls, r)
    return stats.reduce(valid)


class _RankStats:
    """Per-query statistics of ranked neighbour lists, filled chunk by chunk, reduced once.

    The one implementation of Recall@K, R-Precision and MAP@R behind both
    :func:`retrieval_metrics` and :func:`ranking_metrics`. Rows hold ``k`` neighbours; a
    query whose first relevant item is not among them counts as rank ``k``.
    """

    def __init__(self, n_queries: int, k: int, recall_ks, needs_r, device):
        self.k, self.recall_ks, self.needs_r = k, tuple(recall_ks), list(needs_r)
        self.first_hit = torch.empty(n_queries, dtype=torch.long, device=device)
        self.rp = torch.empty(n_queries, dtype=torch.float64, device=device)
        self.ap = torch.empty(n_queries, dtype=torch.float64, device=device)
        self.ranks = torch.arange(1, k + 1, dtype=torch.float64, device=device)

    @staticmethod
    def all_nan(recall_ks, needs_r) -> dict[str, float]:
        return dict.fromkeys([f"recall@{k}" for k in recall_ks] + list(needs_r), math.nan)

    def add(self, start: int, idx: Tensor, q_cls: Tensor, g_cls: Tensor, r: Tensor) -> None:
        """Statistics of queries ``start : start + len(idx)`` from their ``(rows, k)`` lists."""
        stop, k = start + len(idx), self.k
        # (rows, k) relevance of each rank; -1: a slot an approximate index left empty
        same = (g_cls[idx.clamp(min=0)] == q_cls[start:stop, None]) & (idx >= 0)
        if self.recall_ks:
            self.first_hit[start:stop] = torch.where(same.any(1), same.int().argmax(1), k)
        if self.needs_r:
            # Only the first R ranks count (Musgrave et al. 2020).
            r_c = r[start:stop]
            rel = same & (self.ranks[None, :] <= r_c[:, None])
            r_safe = r_c.clamp(min=1).double()
            # R-Precision: relevant items in the top R, over R.
            self.rp[start:stop] = rel.sum(1).double() / r_safe
            # MAP@R: precision@i summed over the relevant ranks i <= R, over R.
            self.ap[start:stop] = (rel.cumsum(1) * rel / self.ranks).sum(1) / r_safe

    def reduce(self, valid: Tensor) -> dict[str, float]:
        """Means over the non-lone queries (``valid``); NaN when there are none."""
        if not bool(valid.any()):
            return self.all_nan(self.recall_ks, self.needs_r)
        # Per-query values are reduced once, so results do not depend on the chunking.
        out = {f"recall@{kk}": float((self.first_hit[valid] < kk).double().mean()) for kk in self.recall_ks}
        if "r_precision" in self.needs_r:
            out["r_precision"] = float(self.rp[valid].mean())
        if "map_at_r" in self.needs_r:
            out["map_at_r"] = float(self.ap[valid].mean())
        return out


def _nmi(query: Tensor, labels: Tensor, backend: str, seed: int) -> float:
    """NMI (arithmetic mean normalisation) of k-means clusters, one per query class."""
    if len(query) == 0:
        return math.nan
    x = np.ascontiguousarray(query.detach().float().cpu().numpy())
    y = labels.cpu().numpy()
    n_clusters = len(np.unique(y))
    if backend == "auto":
        try:
            import_faiss()
            backend = "faiss"
        except ImportError:
            backend = "sklearn"
    if backend == "faiss":
        faiss = import_faiss()
        if len(x) < n_clusters * _FAISS_MIN_POINTS_PER_CENTROID:
            warnings.warn(
                f"NMI: k-means clustering {len(x)} points to {n_clusters} centroids (faiss advises at least "
                f"{n_clusters * _FAISS_MIN_POINTS_PER_CENTROID} points)",
                KMeansSizeWarning,
                stacklevel=3,
            )
        # the warning above replaces the one faiss would print on stderr; the clustering is the same
        kmeans = faiss.Kmeans(x.shape[1], n_clusters, niter=_FAISS_KMEANS_NITER, seed=seed, min_points_per_centroid=1)
        kmeans.train(x)
        clusters = kmeans.index.search(x, 1)[1][:, 0]
    else:
        from sklearn.cluster import KMeans

        kmeans = KMeans(n_clusters, n_init=_SKLEARN_KMEANS_N_INIT, random_state=seed)
        clusters = kmeans.fit_predict(x)
    return float(normalized_mutual_info_score(y, clusters))


_SHORT_NAMES = {"nmi": "NMI", "r_precision": "RP", "map_at_r": "MAP@R"}


def _short_name(metric: str) -> str:
    if metric.startswith("recall@"):
        return "R@" + metric[len("recall@") :]
    return _SHORT_NAMES.get(metric, metric)


def format_metrics_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """Fixed-width table: one row per run, one column per metric, values in percent.

    Columns are the metric names in order of first appearance, shortened (``recall@1`` ->
    ``R@1``, ``map_at_r`` -> ``MAP@R``); a metric a run lacks shows as ``-``.
    """
    metrics: list[str] = []
    for values in rows.values():
        metrics += [m for m in values if m not in metrics]
    header = ["run"] + [_short_name(m) for m in metrics]
    body = [[name] + [_percent(values[m]) if m in values else "-" for m in metrics] for name, values in rows.items()]
    widths = [max(len(line[c]) for line in [header, *body]) for c in range(len(header))]

    def fmt(line: list[str]) -> str:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(w) for cell, w in zip(line[1:], widths[1:], strict=True)]
        return "  ".join(cells).rstrip()

    return "\n".join(fmt(line) for line in [header, *body])


def _percent(value: float) -> str:
    return "nan" if math.isnan(value) else f"{100 * value:.2f}"
