"""Evaluate a model on a test set (every image a query against all others) or a query/gallery pair."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from glassmetric.data.base import RetrievalDataset
from glassmetric.retrieval.embed import embed_dataset
from glassmetric.retrieval.metrics import retrieval_metrics
from glassmetric.retrieval.rerank import DEFAULT_SWEEP_KS

if TYPE_CHECKING:
    from glassmetric.similarity.structural import MarginalKind

log = logging.getLogger("glassmetric.retrieval")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cached_gallery_index(gallery: torch.Tensor, settings=None, folder: str | Path | None = None):
    """The :class:`.index.GalleryIndex` of ``gallery`` embeddings: read from ``folder`` when it
    holds the index of these very embeddings (their fingerprint, size and dimension) built with
    these ``settings``, else built (and saved there, replacing the other one, with a warning on
    stderr that says why). With a ``folder``, a line on stderr says which of the two happened."""
    from glassmetric.config import IndexConfig
    from glassmetric.retrieval.index import MANIFEST, GalleryIndex, choose_kind

    settings = settings or IndexConfig()
    if folder is not None and (Path(folder) / MANIFEST).exists():
        index = GalleryIndex.load(folder, settings)
        why = index.mismatch(gallery, settings)
        if why is None:
            if settings.target_recall is not None and index.kind != "exact" and "recall@10" not in index.params:
                index.set_search_params(settings, gallery)  # saved with other search settings: tune it again
            _say(f"gallery index: read it from {folder} ({index.kind}, {len(index):,} images)")
            return index
        log.warning("the gallery index in %s %s: building it again", folder, why)
    if folder is not None:
        _say(f"gallery index: building it ({choose_kind(len(gallery), settings)}, {len(gallery):,} images) ...")
    index = GalleryIndex.build(gallery, settings)
    if folder is not None:
        index.save(folder)
        _say(f"gallery index: saved to {folder} (read from there next time)")
    return index


def _say(line: str) -> None:
    """A status line of the cached index on stderr (stdout carries the results)."""
    print(line, file=sys.stderr, flush=True)


def evaluate_model(
    model: torch.nn.Module,
    dataset: RetrievalDataset,
    gallery: RetrievalDataset | None = None,
    *,
    recall_ks: tuple[int, ...] = (1, 2, 4, 8),
    batch_size: int = 128,
    num_workers: int = 0,
    knn_backend: str = "auto",
    device: str | torch.device | None = None,
    progress: bool = False,
    index_settings=None,
    index_dir: str | Path | None = None,
    max_k: int | None = None,
) -> dict[str, float]:
    """Retrieval metrics of ``model`` on ``dataset`` (or ``dataset`` as queries against ``gallery``).

    The exact kNN (``"auto"`` or ``"torch"``) runs on ``device``. With ``knn_backend="index"`` the neighbours
    come from the faiss gallery index of ``index_settings`` (:class:`glassmetric.config.IndexConfig`),
    cached in ``index_dir`` (see :func:`cached_gallery_index`). ``max_k`` caps the kNN depth
    (see :func:`~glassmetric.retrieval.metrics.retrieval_metrics`).
    """
    device = device or default_device()
    kw: dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers, "device": device, "progress": progress}
    query, query_labels = embed_dataset(model, dataset, **kw)
    ref, ref_labels = embed_dataset(model, gallery, **kw) if gallery is not None else (None, None)
    index = (
        cached_gallery_index(query if ref is None else ref, index_settings, index_dir)
        if knn_backend == "index"
        else None
    )
    if knn_backend in ("auto", "torch"):  # the exact search on the GPU when there is one
        query, ref = query.to(device), None if ref is None else ref.to(device)
    return retrieval_metrics(
        query,
        query_labels,
        ref,
        ref_labels,
        recall_ks=recall_ks,
        knn_backend=knn_backend,
        knn_index=index,
        max_k=max_k,
    )


def evaluate_rerank_sweep(
    model: torch.nn.Module,
    dataset: RetrievalDataset,
    gallery: RetrievalDataset | None = None,
    *,
    ks: tuple[int, ...] = DEFAULT_SWEEP_KS,
    recall_ks: tuple[int, ...] = (1, 2, 4, 8),
    epsilon: float = 0.05,
    iters: int = 100,
    tol: float | None = None,
    marginals: MarginalKind = "cross_correlation",
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    knn_backend: str = "torch",
    index_settings=None,
    index_dir: str | Path | None = None,
) -> dict[int, dict[str, float]]:
    """R@K / R-Precision / MAP@R after structural re-ranking of each query's global top-K, for
    every K of ``ks`` (K = 0: the global ranking). ``model``'s output must carry ``local`` cells
    (:class:`glassmetric.retriever.model.InferenceModel` gives them training-free for a model
    without a spatial head). ``epsilon, iters, tol, marginals``: the OT settings.

    Embeddings, shortlist and optimal transport on ``device``; with ``knn_backend="index"``
    the shortlist comes from the faiss gallery index (as in :func:`evaluate_model`)."""
    from glassmetric.retrieval.embed import embed_fields
    from glassmetric.retrieval.rerank import rerank_sweep

    kw: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "device": device or default_device(),
        "progress": progress,
    }
    query = embed_fields(model, dataset, **kw)
    ref = embed_fields(model, gallery, **kw) if gallery is not None else None
    index = None
    if knn_backend == "index":
        index = cached_gallery_index((query if ref is None else ref)["embedding"], index_settings, index_dir)
    for fields in filter(None, (query, ref)):
        for name in ("embedding", "local"):
            fields[name] = fields[name].to(kw["device"])
    return rerank_sweep(
        query["embedding"],
        query["local"],
        None if ref is None else ref["embedding"],
        None if ref is None else ref["local"],
        query_labels=query["labels"],
        gallery_labels=None if ref is None else ref["labels"],
        ks=ks,
        recall_ks=recall_ks,
        epsilon=epsilon,
        iters=iters,
        tol=tol,
        marginals=marginals,
        index=index,
    )
