"""Each result of a query's shortlist with the scores a person reads: global, structural, IDML.

For query ``q`` and gallery item ``g`` of a given shortlist ``indices (Q, k)``:

* global: ``cos(e_q, e_g)``, what retrieval ranks by;
* structural (DIML, models with local embeddings): ``SS`` of the transport plan between their
  cells and the multi-scale score ``cos + SS`` (the same block computation as structural
  re-ranking, :mod:`glassmetric.retrieval.rerank`);
* introspective (IDML, models with an uncertainty head): the distance
  ``D = alpha exp(-(b_s beta + b_0) / (a_s alpha + a_0))`` with ``alpha = ||s_q - s_g||^2``
  and ``beta = ||u_q - u_g||^2`` (Wang et al. 2023, Eq. 6), and each image's uncertainty ``||u||``.

The shortlist itself comes from any search (exact kNN, an approximate index), so the scores do
not depend on how the candidates were found.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from glassmetric.retrieval.rerank import _rescore
from glassmetric.similarity.introspective import IntrospectiveParams, image_uncertainty, introspective_distance

__all__ = ["ScoredShortlist", "score_shortlist"]


@dataclass
class ScoredShortlist:
    """All fields ``(Q, k)`` in the order of ``indices``; None where the model lacks the head."""

    indices: Tensor
    global_scores: Tensor
    structural_scores: Tensor | None = None
    multiscale_scores: Tensor | None = None
    introspective_distances: Tensor | None = None
    #: (Q,) and (Q, k): ||u|| of each query and of each result
    query_uncertainty: Tensor | None = None
    result_uncertainty: Tensor | None = None

    def scores(self, q: int) -> list[dict[str, float]]:
        """Query ``q``'s results as ``{"global", "structural", "multiscale", "introspective",
        "uncertainty": value}`` dicts (the keys the model has), in shortlist order."""
        columns = {
            "global": self.global_scores,
            "structural": self.structural_scores,
            "multiscale": self.multiscale_scores,
            "introspective": self.introspective_distances,
            "uncertainty": self.result_uncertainty,
        }
        present = {name: values[q].tolist() for name, values in columns.items() if values is not None}
        return [{name: float(v[r]) for name, v in present.items()} for r in range(self.indices.shape[1])]


@torch.no_grad()
def score_shortlist(
    query: Mapping[str, Tensor],
    gallery: Mapping[str, Tensor],
    indices: Tensor,
    *,
    epsilon: float = 0.05,
    iters: int = 100,
    tol: float | None = None,
    marginals: str = "cross_correlation",
    introspective: IntrospectiveParams | None = None,
) -> ScoredShortlist:
    """Score ``indices (Q, k)`` of ``gallery`` for each query.

    ``query`` and ``gallery`` hold :func:`glassmetric.retrieval.embed.embed_fields` outputs:
    ``"embedding"`` (N, D) always, ``"local"`` (N, g*g, D) and ``"uncertainty"`` (N, Du) when
    the model has them (both sides must). ``epsilon, iters, tol, marginals``: the OT settings of the
    structural score. ``introspective`` defaults to the paper's parameters.
    """
    idx = torch.as_tensor(indices).long()
    qg, gg = query["embedding"].float(), gallery["embedding"].float()
    if idx.ndim != 2 or len(idx) != len(qg):
        raise ValueError(f"indices must be (Q={len(qg)}, k), got shape {tuple(idx.shape)}")
    out = ScoredShortlist(indices=idx, global_scores=(qg[:, None, :] * gg[idx]).sum(-1))
    if query.get("local") is not None and gallery.get("local") is not None and idx.numel():
        kw: dict[str, Any] = {"epsilon": epsilon, "iters": iters, "tol": tol, "marginals": marginals}
        _, ss = _rescore(qg, query["local"].float(), gg, gallery["local"].float(), idx, None, kw)
        out.structural_scores, out.multiscale_scores = ss, out.global_scores + ss
    uq, ug = query.get("uncertainty"), gallery.get("uncertainty")
    if uq is not None and ug is not None:
        sq, sg = torch.nn.functional.normalize(qg, dim=1), torch.nn.functional.normalize(gg, dim=1)
        alpha = (sq[:, None, :] - sg[idx]).pow(2).sum(-1)
        beta = (uq.float()[:, None, :] - ug.float()[idx]).pow(2).sum(-1)
        out.introspective_distances = introspective_distance(alpha, beta, introspective or IntrospectiveParams())
        out.query_uncertainty = image_uncertainty(uq)
        out.result_uncertainty = image_uncertainty(ug)[idx]
    return out
