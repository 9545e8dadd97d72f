"""Evaluate a model on a test set (every image a query against all others) or a query/gallery pair."""

from __future__ import annotations

import torch

from glassmetric.data.base import RetrievalDataset
from glassmetric.retrieval.embed import embed_dataset
from glassmetric.retrieval.metrics import retrieval_metrics


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
) -> dict[str, float]:
    """Retrieval metrics of ``model`` on ``dataset`` (or ``dataset`` as queries against ``gallery``)."""
    device = device or default_device()
    kw = dict(batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)
    query, query_labels = embed_dataset(model, dataset, **kw)
    if gallery is None:
        return retrieval_metrics(query, query_labels, recall_ks=recall_ks, knn_backend=knn_backend)
    ref, ref_labels = embed_dataset(model, gallery, **kw)
    return retrieval_metrics(query, query_labels, ref, ref_labels, recall_ks=recall_ks, knn_backend=knn_backend)
