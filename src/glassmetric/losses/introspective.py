"""The introspective distance inside any pytorch-metric-learning loss, proxy losses included
(IDML, Wang et al. 2023), used as any pytorch-metric-learning loss is::

    from pytorch_metric_learning.losses import ProxyAnchorLoss
    from glassmetric.losses import IntrospectiveLoss

    loss_fn = IntrospectiveLoss(ProxyAnchorLoss(num_classes, embedding_size=D))
    loss = loss_fn(semantic, uncertainty, labels)  # (B, D), (B, Du), (B,)

pytorch-metric-learning hands a distance one matrix per side, so internally each image is packed
as ``[semantic s (D) | uncertainty u (Du)]`` (:func:`pack`). A reference of width D alone (the
proxies of ProxyAnchor / ProxyNCA) has zero uncertainty. The packed vector must not be
normalised as a whole (that would rescale u): these distances normalise s themselves and keep
u as it is, while reporting ``normalize_embeddings=True`` to the losses and miners that check
for normalised Lp distances (FastAP, distance-weighted sampling), whose assumption (unit
semantic vectors) holds.

Calibration, as for the structural similarity: with alpha = ||s_x - s_y||^2 and D the
introspective distance (:mod:`glassmetric.similarity.introspective`),

* similarity-calibrated losses (MultiSimilarity, ProxyAnchor) see ``1 - D / 2`` (= cos when
  the shrink factor is 1; the release's ``1 - (1 - cos) exp(...)``);
* distance-calibrated ones see ``sqrt(D)`` (= ||s_x - s_y|| when the factor is 1), squared by
  pytorch-metric-learning where the loss uses ``power=2`` (ProxyNCA, FastAP).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity, LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from torch import nn

from glassmetric.similarity.introspective import (
    IntrospectiveParams,
    introspective_distance,
    introspective_distance_matrix,
)


def pack(semantic: torch.Tensor, uncertainty: torch.Tensor) -> torch.Tensor:
    """(B, D) and (B, Du) -> (B, D + Du)."""
    return torch.cat([semantic, uncertainty], dim=1)


class _IntrospectiveMixin:
    dim: int
    params: IntrospectiveParams

    def _split(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if packed.shape[1] == self.dim:
            return packed, None  # a proxy: zero uncertainty
        if packed.shape[1] <= self.dim:
            raise ValueError(
                f"introspective distance: expected width {self.dim} (+ uncertainty), got {packed.shape[1]}"
            )
        return packed[:, : self.dim], packed[:, self.dim :]

    def _distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        sq, uq = self._split(query_emb)
        sr, ur = self._split(ref_emb)
        return introspective_distance_matrix(sq, uq, sr, ur, self.params)

    def _pairwise(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        """Row i of query against row i of ref (the diagonal, without the full matrix)."""
        sq, uq = self._split(query_emb)
        sr, ur = self._split(ref_emb)
        sq, sr = F.normalize(sq, dim=1), F.normalize(sr, dim=1)
        alpha = (2.0 - 2.0 * (sq * sr).sum(1)).clamp(min=0.0)
        if uq is None and ur is None:
            beta = torch.zeros_like(alpha)
        else:
            if uq is None:
                assert ur is not None  # not both missing (the branch above)
                uq = torch.zeros_like(ur)
            ur = ur if ur is not None else torch.zeros_like(uq)
            beta = ((uq - ur) ** 2).sum(1)
        return introspective_distance(alpha, beta, self.params)

    def maybe_normalize(self, embeddings: torch.Tensor, dim: int = 1, **kwargs) -> torch.Tensor:
        return embeddings  # s is normalised in _distance; u must keep its norm


class IntrospectiveSimilarity(_IntrospectiveMixin, CosineSimilarity):
    """``1 - D / 2`` for similarity-calibrated losses (MultiSimilarity, ProxyAnchor)."""

    def __init__(self, dim: int = 0, params: IntrospectiveParams = IntrospectiveParams(), **kwargs):
        super().__init__(**kwargs)
        self.dim, self.params = int(dim), params

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        return 1.0 - 0.5 * self._distance(query_emb, ref_emb)

    def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        return 1.0 - 0.5 * self._pairwise(query_emb, ref_emb)


class IntrospectiveDistance(_IntrospectiveMixin, LpDistance):
    """``sqrt(D)`` for distance-calibrated losses and miners (Contrastive, Triplet, Margin;
    ProxyNCA and FastAP square it through ``power=2``)."""

    def __init__(self, dim: int = 0, params: IntrospectiveParams = IntrospectiveParams(), **kwargs):
        super().__init__(**kwargs)
        self.dim, self.params = int(dim), params

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self._distance(query_emb, ref_emb).clamp(min=1e-12))

    def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self._pairwise(query_emb, ref_emb).clamp(min=1e-12))


def use_introspective_distance(module: nn.Module | None, params: IntrospectiveParams, dim: int = 0) -> None:
    """Give a pytorch-metric-learning loss or miner the introspective distance of its own
    calibration: ``1 - D / 2`` where its distance is inverted (a similarity), else ``sqrt(D)`` at
    its ``power``. ``dim`` (the semantic width) may be left 0 and set per batch."""
    if module is None:
        return
    own = cast(BaseDistance, module.distance)  # nn.Module's attributes are typed Tensor | Module
    module.distance = (
        IntrospectiveSimilarity(dim, params) if own.is_inverted else IntrospectiveDistance(dim, params, power=own.power)
    )


def introspective_loss(
    loss: nn.Module, miner: nn.Module | None, semantic: torch.Tensor, uncertainty: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """``loss`` (mined by ``miner``) on the introspective distances of ``semantic (B, D)`` and
    ``uncertainty (B, Du)``; both must carry an introspective distance
    (:func:`use_introspective_distance`)."""
    if semantic.ndim != 2 or uncertainty.ndim != 2 or len(semantic) != len(uncertainty):
        raise ValueError(
            f"expected semantic (B, D) and uncertainty (B, Du), got {tuple(semantic.shape)} "
            f"and {tuple(uncertainty.shape)}"
        )
    for m in (loss, miner):
        if m is not None:
            # set by use_introspective_distance (nn.Module's attributes are typed Tensor | Module)
            cast(_IntrospectiveMixin, m.distance).dim = semantic.shape[1]
    embeddings = pack(semantic, uncertainty.to(semantic.dtype))
    indices = miner(embeddings, labels) if miner is not None else None
    return loss(embeddings, labels, indices)


class IntrospectiveLoss(nn.Module):
    """A pytorch-metric-learning loss on the introspective distance of the batch.

    Args:
        base_loss: any pytorch-metric-learning loss that compares through its distance, proxy
            losses included (ProxyAnchor, ProxyNCA: proxies carry zero uncertainty). Its
            distance is replaced by the introspective one of the same calibration (the module
            is used in place, so its proxies stay those the caller holds).
        params: the introspective distance's scales and offsets.
        miner: an optional pytorch-metric-learning miner, given the same distance.

    ``forward(semantic (B, D), uncertainty (B, Du), labels (B,))``: the semantic embedding is
    L2-normalised by the distance; the uncertainty embedding is used as it is.
    """

    def __init__(
        self,
        base_loss: nn.Module,
        params: IntrospectiveParams = IntrospectiveParams(),
        *,
        miner: nn.Module | None = None,
    ):
        super().__init__()
        if not isinstance(base_loss, BaseMetricLossFunction):
            raise TypeError(f"expected a pytorch-metric-learning loss, got {type(base_loss).__name__}")
        self.loss = base_loss
        self.miner = miner
        self.params = params
        use_introspective_distance(base_loss, params)
        use_introspective_distance(miner, params)

    def forward(self, semantic: torch.Tensor, uncertainty: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return introspective_loss(self.loss, self.miner, semantic, uncertainty, labels)

    def extra_repr(self) -> str:
        return f"params={self.params}"
