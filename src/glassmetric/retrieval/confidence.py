"""Which answers to trust: confidence scores of a retrieval, judged by how well they predict an R@1 hit.

Every score is a confidence (higher = more confident). For a query ``q`` whose gallery
neighbours have the cosines ``s_1 >= s_2 >= ...`` (the query itself left out in the same set):

* ``top1_cosine``: ``s_1``.
* ``margin``: ``s_1 - s_2``, how far the first neighbour stands out.
* ``knn_density``: ``(1/k) sum_{j <= k} s_j``, how crowded the query's neighbourhood is.
* ``uncertainty`` (IDML): ``-||u_q||``, the per-image uncertainty (low = confident).
* ``pair_uncertainty`` (IDML): ``-||u_q - u_n||^2`` for the first neighbour ``n``, the
  uncertainty distance beta of the introspective distance ``D = alpha exp(-beta / alpha)``
  (:mod:`glassmetric.similarity.introspective`) of the pair that decides R@1.
* ``pair_uncertainty_sum`` (IDML): ``-(||u_q|| + ||u_n||)``, the doubt about either image of that pair.

The first three need no training beyond the embedding; the uncertainty scores are what IDML
adds. Two judgements of a score, on the queries' R@1 hits:

* :func:`failure_auroc`: the AUROC of the score for "R@1 is wrong" (low confidence should mean
  a miss): 0.5 for a score that knows nothing, 1 when every miss is less confident than
  every hit. Ties count half.
* :func:`kept_recall` (the risk-coverage curve): ``curve[i - 1]`` is the R@1 of the ``i`` most
  confident queries, for ``i = 1..N`` (coverage ``i / N``). Queries tied in confidence are
  taken in a random order, and the curve is the expectation over those orders: inside a tie
  group of ``m`` queries with ``h`` hits, reached after ``n`` queries with ``c`` hits, keeping
  ``j`` of them gives ``(c + j h / m) / (n + j)``. Its area :func:`kept_recall_area` is the
  mean of the curve, the overall R@1 for a score that knows nothing, and higher is better.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from glassmetric.retrieval.knn import knn
from glassmetric.retrieval.uncertainty import auroc

__all__ = [
    "TRAINING_FREE",
    "compare_confidences",
    "confidence_scores",
    "failure_auroc",
    "kept_recall",
    "kept_recall_area",
]

#: the scores that need no uncertainty head
TRAINING_FREE = ("top1_cosine", "margin", "knn_density")


def confidence_scores(
    query: Tensor,
    query_labels: Tensor,
    gallery: Tensor | None = None,
    gallery_labels: Tensor | None = None,
    *,
    uncertainty: Tensor | None = None,
    gallery_uncertainty: Tensor | None = None,
    k: int = 10,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The confidence scores of every query (module docstring) and its R@1 hit.

    ``query`` (Q, D) and ``gallery`` (G, D) are L2-normalised embeddings (None: the query set
    against itself, each query left out of its own neighbours); ``uncertainty`` (Q, Du) and
    ``gallery_uncertainty`` (G, Du) the IDML uncertainty embeddings (the query's own when there
    is no gallery), which add the three uncertainty scores. ``k``: neighbours of the density,
    capped at the gallery's size.

    Returns ``({name: (Q,) float64}, (Q,) bool hit)``.
    """
    same = gallery is None
    if gallery is None:
        ref, ref_labels, ref_u = query, query_labels, uncertainty
    elif gallery_labels is None:
        raise ValueError("gallery_labels are needed with a gallery")
    else:
        ref, ref_labels, ref_u = gallery, gallery_labels, gallery_uncertainty
    available = len(ref) - int(same)
    if available < 2:
        raise ValueError(f"the margin needs 2 neighbours per query, the gallery has {available}")
    sims, idx = knn(query, ref, min(max(k, 2), available), exclude_self=same)
    sims = sims.double().cpu()
    first = idx[:, 0].cpu()
    hit = (torch.as_tensor(ref_labels).cpu()[first] == torch.as_tensor(query_labels).cpu()).numpy()
    scores = {
        "top1_cosine": sims[:, 0].numpy(),
        "margin": (sims[:, 0] - sims[:, 1]).numpy(),
        "knn_density": sims[:, : min(k, available)].mean(1).numpy(),
    }
    if uncertainty is not None:
        if ref_u is None:
            raise ValueError("gallery_uncertainty is needed with a gallery and a query uncertainty")
        uq, un = uncertainty.double().cpu(), ref_u.double().cpu()[first]
        scores["uncertainty"] = (-uq.norm(dim=1)).numpy()
        scores["pair_uncertainty"] = (-((uq - un) ** 2).sum(1)).numpy()
        scores["pair_uncertainty_sum"] = (-(uq.norm(dim=1) + un.norm(dim=1))).numpy()
    return scores, hit


def failure_auroc(confidence: np.ndarray, hit: np.ndarray) -> float:
    """AUROC of low ``confidence`` for an R@1 miss (NaN when every query hits or every one misses)."""
    return auroc(-np.asarray(confidence, dtype=np.float64), ~np.asarray(hit, dtype=bool))


def kept_recall(confidence: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """``(N,)`` expected R@1 of the ``i`` most confident queries, ``i = 1..N`` (ties: a random order)."""
    conf = np.asarray(confidence, dtype=np.float64)
    hits = np.asarray(hit, dtype=np.float64)
    if conf.shape != hits.shape or conf.ndim != 1:
        raise ValueError(f"confidence and hit must be equal-length vectors, got {conf.shape} and {hits.shape}")
    order = np.argsort(-conf, kind="stable")
    conf, hits = conf[order], hits[order]
    curve = np.empty(len(conf))
    start, correct = 0, 0.0
    while start < len(conf):
        stop = start + 1
        while stop < len(conf) and conf[stop] == conf[start]:
            stop += 1
        rate = hits[start:stop].mean()
        j = np.arange(1, stop - start + 1)
        curve[start:stop] = (correct + j * rate) / (start + j)
        correct += hits[start:stop].sum()
        start = stop
    return curve


def kept_recall_area(confidence: np.ndarray, hit: np.ndarray) -> float:
    """Area under the risk-coverage curve: the mean of :func:`kept_recall` (NaN without queries)."""
    curve = kept_recall(confidence, hit)
    return float(curve.mean()) if len(curve) else math.nan


def compare_confidences(
    scores: Mapping[str, np.ndarray], hit: np.ndarray, coverages: tuple[float, ...] = (0.5, 0.8)
) -> dict[str, dict[str, float]]:
    """Per score: ``auroc`` (:func:`failure_auroc`), ``area`` (:func:`kept_recall_area`) and
    ``recall@1_at_<c>`` for each coverage ``c`` (the R@1 of the ``ceil(c N)`` most confident
    queries); plus the rows ``all`` (every query kept: area = R@1) and ``oracle`` (the hits
    first: the best any score can do)."""
    hit = np.asarray(hit, dtype=bool)
    n = len(hit)

    def row(confidence: np.ndarray) -> dict[str, float]:
        curve = kept_recall(confidence, hit)
        out = {"auroc": failure_auroc(confidence, hit), "area": float(curve.mean()) if n else math.nan}
        for c in coverages:
            out[f"recall@1_at_{c:g}"] = float(curve[max(1, math.ceil(c * n - 1e-9)) - 1]) if n else math.nan
        return out

    table = {name: row(np.asarray(s, dtype=np.float64)) for name, s in scores.items()}
    table["all"] = row(np.zeros(n))
    table["oracle"] = row(hit.astype(np.float64))
    return table
