"""DIML's structural similarity inside any pytorch-metric-learning pair-based loss (Zhao et al.
2021, Sec. 3.4), used as any pytorch-metric-learning loss is::

    from pytorch_metric_learning.losses import MultiSimilarityLoss
    from glassmetric.losses import StructuralLoss

    loss_fn = StructuralLoss(MultiSimilarityLoss())
    loss = loss_fn(global_emb, local_emb, labels)  # (B, D), (B, N, D), (B,)

The B x B structural similarity of the batch (:func:`glassmetric.similarity.structural_similarity_matrix`,
batched and chunked, with the transport plan a constant by default: gradients flow through the
cell similarities S, ``dSS/dS = T``, and on the CPU the plans come from the native lane kernel
of re-ranking) replaces the matrix the loss (and its miner) would compute from the
embeddings; everything else about the loss (margins, reducer, regularizers on the global
embedding) stays as the user built it.

Losses are calibrated either for a similarity (MultiSimilarity: cosine-like, in [-1, 1]) or
for the Euclidean distance of unit vectors (Contrastive, Triplet, Margin: in [0, 2]); which one
is read from the loss's own distance (``distance.is_inverted``). The structural similarity fills
the first role directly and the second as ``d = sqrt(2 - 2 SS)``, the distance two unit vectors
with cosine SS would have (raised to the distance's ``power``), so every paper default (margins,
beta, miner cut-offs) keeps its meaning. With ``multiscale=True`` the matrix is the multi-scale
score halved, ``(cos(g_a, g_b) + SS_ab) / 2``, so it stays in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity, LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightMixin
from torch import nn

from glassmetric.similarity.ot_settings import OTSettings
from glassmetric.similarity.structural import _structural_similarity_matrix, check_normalised

__all__ = ["StructuralLoss", "StructuralSettings", "batch_structural_similarity"]


@dataclass(frozen=True)
class StructuralSettings:
    """How a structural loss compares the images of a batch."""

    #: the optimal-transport settings (``OTSettings.from_config(cfg)`` in training)
    ot: OTSettings = field(default_factory=OTSettings)
    #: add the global cosine: the multi-scale score s_global + SS (in [-2, 2], halved here to stay in [-1, 1])
    multiscale: bool = False
    #: rows of the B x B matrix solved per batched call (None: all at once)
    chunk_size: int | None = 32


def batch_structural_similarity(
    global_emb: torch.Tensor, local_emb: torch.Tensor, settings: StructuralSettings
) -> torch.Tensor:
    """``(B, B)`` structural similarity (or halved multi-scale score) of a batch of L2-normalised
    ``global_emb (B, D)`` and ``local_emb (B, N, D)``; not checked (see :class:`StructuralLoss`)."""
    mat = _structural_similarity_matrix(local_emb, local_emb, global_emb, global_emb, settings.ot, settings.chunk_size)
    if settings.multiscale:
        g = global_emb.to(mat.dtype)
        mat = 0.5 * (mat + g @ g.T)
    return mat


class _BatchMatrix:
    """A distance that hands out the batch's precomputed matrix, set for one step: the miner and
    the loss both ask for it (miners modify their copy in place, so each caller gets a clone)."""

    _batch: torch.Tensor | None = None

    def set_batch(self, matrix: torch.Tensor) -> None:
        self._batch = matrix

    def clear_batch(self) -> None:
        self._batch = None

    def _similarity(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        batch = self._batch
        if batch is None or batch.shape != (len(query_emb), len(ref_emb)):
            raise RuntimeError(
                "the structural similarity is computed for the whole batch: use the loss through "
                "StructuralLoss (a reference set or cross-batch memory is not supported)"
            )
        return batch.clone()

    def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the structural similarity is computed as a matrix; use compute_mat")


class StructuralSimilarity(_BatchMatrix, CosineSimilarity):
    """SS for similarity-calibrated losses and miners (MultiSimilarity)."""

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        return self._similarity(query_emb, ref_emb)


class StructuralDistance(_BatchMatrix, LpDistance):
    """``sqrt(2 - 2 SS)`` for distance-calibrated losses and miners (Contrastive, Triplet, Margin).

    It is an LpDistance (p = 2, normalised) to the miners that check for one, such as
    distance-weighted sampling.
    """

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.clamp(2.0 - 2.0 * self._similarity(query_emb, ref_emb), min=1e-12))


def use_structural_distance(module: nn.Module | None) -> None:
    """Give a pytorch-metric-learning loss or miner the structural distance of its own calibration
    (a similarity where its distance is inverted, else ``sqrt(2 - 2 SS)`` at its ``power``)."""
    if module is None:
        return
    own = cast(BaseDistance, module.distance)  # nn.Module's attributes are typed Tensor | Module
    module.distance = StructuralSimilarity() if own.is_inverted else StructuralDistance(power=own.power)


def structural_loss(
    loss: nn.Module,
    miner: nn.Module | None,
    global_emb: torch.Tensor,
    local_emb: torch.Tensor,
    labels: torch.Tensor,
    settings: StructuralSettings,
) -> torch.Tensor:
    """``loss`` (mined by ``miner``) on the batch's structural matrix; both must carry a
    structural distance (:func:`use_structural_distance`). The inputs are checked to be
    L2-normalised; the loss sees the global embeddings as its ``embeddings`` (what embedding
    regularizers act on)."""
    if (
        local_emb.ndim != 3
        or global_emb.ndim != 2
        or local_emb.shape[0] != global_emb.shape[0]
        or local_emb.shape[-1] != global_emb.shape[-1]
    ):
        raise ValueError(
            f"expected global_emb (B, D) and local_emb (B, N, D), got "
            f"{tuple(global_emb.shape)} and {tuple(local_emb.shape)}"
        )
    check_normalised(global_emb=global_emb, local_emb=local_emb)
    matrix = batch_structural_similarity(global_emb, local_emb, settings)
    embeddings = global_emb.to(matrix.dtype)
    # set by use_structural_distance (nn.Module's attributes are typed Tensor | Module)
    distances = [cast(_BatchMatrix, m.distance) for m in (loss, miner) if m is not None]
    for d in distances:
        d.set_batch(matrix)
    try:
        indices = miner(embeddings, labels) if miner is not None else None
        return loss(embeddings, labels, indices)
    finally:
        for d in distances:
            d.clear_batch()


class StructuralLoss(nn.Module):
    """A pytorch-metric-learning pair-based loss on the structural similarity of the batch.

    Args:
        base_loss: e.g. ``MultiSimilarityLoss()``, ``ContrastiveLoss()``, ``TripletMarginLoss()``,
            ``MarginLoss(num_classes)``: a loss that reads the batch only through its distance
            matrix. Its distance is replaced by the structural one of the same calibration (the
            module is used in place, so its parameters, e.g. MarginLoss's beta, stay those the
            caller holds). Proxy and classifier losses (ProxyAnchor, ArcFace, ...) are refused:
            their weights have no local cells to match.
        settings: the optimal-transport settings (:class:`~glassmetric.similarity.OTSettings`).
        multiscale: compare by the halved multi-scale score ``(cos(g_a, g_b) + SS_ab) / 2``.
        miner: an optional pytorch-metric-learning miner, given the same matrix.
        chunk_size: rows of the B x B matrix solved per batched call (None: all at once).

    ``forward(global_emb (B, D), local_emb (B, N, D), labels (B,))``: both embeddings
    L2-normalised along the last dimension (a ValueError otherwise).
    """

    def __init__(
        self,
        base_loss: nn.Module,
        settings: OTSettings = OTSettings(),
        multiscale: bool = False,
        *,
        miner: nn.Module | None = None,
        chunk_size: int | None = 32,
    ):
        super().__init__()
        check_pair_based(base_loss)
        if not isinstance(settings, OTSettings):
            raise TypeError(f"settings must be an OTSettings, got {type(settings).__name__}")
        self.loss = base_loss
        self.miner = miner
        self.settings = StructuralSettings(settings, bool(multiscale), chunk_size)
        use_structural_distance(base_loss)
        use_structural_distance(miner)

    def forward(self, global_emb: torch.Tensor, local_emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return structural_loss(self.loss, self.miner, global_emb, local_emb, labels, self.settings)

    def extra_repr(self) -> str:
        s = self.settings
        return f"ot={s.ot}, multiscale={s.multiscale}, chunk_size={s.chunk_size}"


def check_pair_based(loss: nn.Module) -> None:
    """A TypeError unless ``loss`` is a pytorch-metric-learning loss, a ValueError where it has
    class weights (proxies, classifier weights)."""
    if not isinstance(loss, BaseMetricLossFunction):
        raise TypeError(f"expected a pytorch-metric-learning loss, got {type(loss).__name__}")
    if isinstance(loss, WeightMixin):
        raise ValueError(
            f"{type(loss).__name__} compares embeddings with learned class weights, which have "
            f"no local cells: the structural similarity needs a pair-based loss"
        )
