"""DIML's structural similarity as a pytorch-metric-learning distance, so pair-based losses and
their miners run on the B x B structural similarity of a batch (Zhao et al. 2021, Sec. 3.4).

pytorch-metric-learning hands a distance one embedding matrix per side, so each image is
packed as ``[global (D) | local cells (N*D)]`` (:func:`pack`) and unpacked here. The matrix is
computed batched and chunked (:func:`structural_similarity_matrix`), with the transport plan
treated as a constant by default: gradients flow through the cell similarities S.

Losses are calibrated either for a similarity (MultiSimilarity: cosine-like, in [-1, 1]) or
for the Euclidean distance of unit vectors (Contrastive, Triplet, Margin: in [0, 2]). The
structural similarity fills the first role directly and the second as
``d = sqrt(2 - 2 SS)``, the distance two unit vectors with cosine SS would have, so every
paper default (margins, beta, miner cut-offs) keeps its meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

from glassmetric.similarity.structural import structural_similarity_matrix


@dataclass(frozen=True)
class StructuralSettings:
    """How the structural similarity is computed (DIML defaults)."""

    cells: int
    dim: int
    epsilon: float = 0.05
    iters: int = 100
    marginals: str = "cross_correlation"
    #: add the global cosine: the multi-scale score s_global + SS (in [-2, 2], halved here to stay in [-1, 1])
    multiscale: bool = False
    chunk_size: int | None = 32


def pack(global_embedding: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """(B, D) and (B, N, D) -> (B, D + N*D)."""
    return torch.cat([global_embedding, local.flatten(1)], dim=1)


def unpack(packed: torch.Tensor, settings: StructuralSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack`, re-normalising each part (pytorch-metric-learning may have
    normalised the packed vector as a whole, which scales but does not rotate the parts)."""
    d = settings.dim
    glob = torch.nn.functional.normalize(packed[:, :d], dim=-1)
    local = torch.nn.functional.normalize(packed[:, d:].reshape(len(packed), settings.cells, d), dim=-1)
    return glob, local


def structural_matrix(query: torch.Tensor, ref: torch.Tensor, s: StructuralSettings) -> torch.Tensor:
    """(Q, R) structural similarity (or halved multi-scale score) of packed embeddings."""
    qg, ql = unpack(query, s)
    rg, rl = unpack(ref, s)
    mat = structural_similarity_matrix(
        ql, qg, rl, rg, chunk_size=s.chunk_size, epsilon=s.epsilon, iters=s.iters, marginals=s.marginals
    )
    if s.multiscale:
        mat = 0.5 * (mat + qg.float() @ rg.float().T)
    return mat


class _BatchMatrixMixin:
    """Computes the batch's matrix once per training step: the miner and the loss both ask for
    it (miners modify their copy in place, so each caller gets a clone)."""

    settings: StructuralSettings

    def set_batch(self, packed: torch.Tensor) -> None:
        self._batch = structural_matrix(packed, packed, self.settings)

    def clear_batch(self) -> None:
        self._batch = None

    def _similarity(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        batch = getattr(self, "_batch", None)
        if batch is not None and batch.shape == (len(query_emb), len(ref_emb)):
            return batch.clone()
        return structural_matrix(query_emb, ref_emb, self.settings)

    def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the structural similarity is computed as a matrix; use compute_mat")


class StructuralSimilarity(_BatchMatrixMixin, CosineSimilarity):
    """Similarity for similarity-calibrated losses (MultiSimilarity)."""

    def __init__(self, settings: StructuralSettings, **kwargs):
        super().__init__(**kwargs)
        self.settings = settings

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        return self._similarity(query_emb, ref_emb)


class StructuralDistance(_BatchMatrixMixin, LpDistance):
    """``sqrt(2 - 2 SS)`` for distance-calibrated losses and miners (Contrastive, Triplet, Margin).

    It is an LpDistance (p = 2, normalised) to the miners that check for one, such as
    distance-weighted sampling.
    """

    def __init__(self, settings: StructuralSettings, **kwargs):
        super().__init__(**kwargs)
        self.settings = settings

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.clamp(2.0 - 2.0 * self._similarity(query_emb, ref_emb), min=1e-12))
