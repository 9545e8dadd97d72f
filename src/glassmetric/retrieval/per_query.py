"""Per-query retrieval quality, to find a model's worst and best queries.

For a ranking ``neighbour_indices (Q, L)`` (best first): the R@1 hit of every query and its
average precision at R (Musgrave et al. 2020), ``AP@R = (1/R) sum_{i<=R} P(i) rel(i)`` with R the
number of gallery items of the query's class (the query itself left out in same-set mode).
Their means over the queries with R > 0 are the R@1 and MAP@R of
:func:`glassmetric.retrieval.metrics.ranking_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["PerQuery", "per_query_metrics", "relevant_counts"]


@dataclass
class PerQuery:
    hit_at_1: np.ndarray  #: (Q,) bool
    ap_at_r: np.ndarray  #: (Q,) float64, NaN for a query without relevant items (R = 0)
    relevant: np.ndarray  #: (Q,) R


def relevant_counts(query_labels: Tensor, gallery_labels: Tensor) -> Tensor:
    """(Q,) number of gallery items of each query's class (without a Q x G matrix)."""
    classes, counts = torch.unique(torch.as_tensor(gallery_labels).long(), return_counts=True)
    q = torch.as_tensor(query_labels).long()
    pos = torch.searchsorted(classes, q).clamp(max=max(len(classes) - 1, 0))
    found = (classes[pos] == q) if len(classes) else torch.zeros_like(q, dtype=torch.bool)
    return torch.where(found, counts[pos] if len(classes) else torch.zeros_like(q), torch.zeros_like(q))


def per_query_metrics(
    neighbour_indices: Tensor, query_labels: Tensor, gallery_labels: Tensor, *, exclude_self: bool = False
) -> PerQuery:
    """R@1 hit and AP@R of each query; rows must hold at least R neighbours (and one)."""
    idx = torch.as_tensor(neighbour_indices).long()
    q_lab, g_lab = torch.as_tensor(query_labels).long(), torch.as_tensor(gallery_labels).long()
    r = relevant_counts(q_lab, g_lab) - int(exclude_self)
    if len(idx) and idx.shape[1] < max(1, int(r.max())):
        raise ValueError(f"AP@R needs R neighbours per query (R up to {int(r.max())}), got {idx.shape[1]}")
    rel = (g_lab[idx] == q_lab[:, None]).double()  # (Q, L)
    pos = torch.arange(1, idx.shape[1] + 1, dtype=torch.float64)
    within_r = pos[None, :] <= r[:, None]
    precision = rel.cumsum(1) / pos
    ap = (precision * rel * within_r).sum(1) / r.clamp(min=1)
    ap = torch.where(r > 0, ap, torch.full_like(ap, float("nan")))
    return PerQuery(
        hit_at_1=rel[:, 0].bool().numpy() if idx.shape[1] else np.zeros(len(idx), bool),
        ap_at_r=ap.numpy(),
        relevant=r.numpy(),
    )
