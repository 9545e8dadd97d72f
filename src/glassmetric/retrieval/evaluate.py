"""Evaluate a model on a test set (every image a query against all others) or a query/gallery pair."""

from __future__ import annotations

import torch

from glassmetric.data.base import RetrievalDataset
from glassmetric.retrieval.embed import embed_dataset
from glassmetric.retrieval.metrics import retrieval_metrics
from glassmetric.retrieval.rerank import DEFAULT_SWEEP_KS


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_model(
    model: torch.nn.Module,
    dataset: RetrievalDataset,
    gallery: RetrievalDataset | None = None,
    *,
    recall_ks: tuple[int, ...] = (1, 2, 4, 8),
    batch_size: int = 128,
    num_workers: int = 0,
    knn_backend: str = "torch",
    device: str | torch.device | None = None,
    progress: bool = False,
    max_k: int | None = None,
) -> dict[str, float]:
    """Retrieval metrics of ``model`` on ``dataset`` (or ``dataset`` as queries against ``gallery``);
    ``max_k`` caps the kNN depth (see :func:`~glassmetric.retrieval.metrics.retrieval_metrics`)."""
    device = device or default_device()
    kw = dict(batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)
    query, query_labels = embed_dataset(model, dataset, **kw)
    if gallery is None:
        return retrieval_metrics(query, query_labels, recall_ks=recall_ks, knn_backend=knn_backend, max_k=max_k)
    ref, ref_labels = embed_dataset(model, gallery, **kw)
    return retrieval_metrics(query, query_labels, ref, ref_labels, recall_ks=recall_ks, knn_backend=knn_backend, max_k=max_k)


def evaluate_rerank_sweep(
    model: torch.nn.Module,
    dataset: RetrievalDataset,
    gallery: RetrievalDataset | None = None,
    *,
    ks: tuple[int, ...] = DEFAULT_SWEEP_KS,
    grid: int = 4,
    recall_ks: tuple[int, ...] = (1, 2, 4, 8),
    epsilon: float = 0.05,
    iters: int = 100,
    marginals: str = "cross_correlation",
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[int, dict[str, float]]:
    """R@K / R-Precision / MAP@R after structural re-ranking of each query's global top-K, for
    every K of ``ks`` (K = 0: the global ranking). Training-free on any model: without a spatial
    head, its global head is applied at every location (DIML, Zhao et al. 2021, Sec. 3.5)."""
    from glassmetric.models.spatial_head import ensure_spatial_head
    from glassmetric.retrieval.embed import embed_fields
    from glassmetric.retrieval.rerank import rerank_sweep

    ensure_spatial_head(model, grid)
    kw = dict(batch_size=batch_size, num_workers=num_workers, device=device or default_device(), progress=progress)
    query = embed_fields(model, dataset, **kw)
    ref = embed_fields(model, gallery, **kw) if gallery is not None else None
    return rerank_sweep(
        query["embedding"], query["local"],
        None if ref is None else ref["embedding"], None if ref is None else ref["local"],
        query_labels=query["labels"], gallery_labels=None if ref is None else ref["labels"],
        ks=ks, recall_ks=recall_ks, epsilon=epsilon, iters=iters, marginals=marginals,
    )
