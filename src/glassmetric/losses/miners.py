"""Miners whose pytorch-metric-learning versions infer something from the embedding's width.

The introspective losses hand the miners packed embeddings (``[semantic | uncertainty]``), whose
width is not the dimension of the unit sphere the semantic embeddings live on.
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.miners import DistanceWeightedMiner
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu


class SphereDistanceWeightedMiner(DistanceWeightedMiner):
    """Distance-weighted sampling (Wu et al. 2017, Sec. 4) on the sphere S^(n-1) of a given n.

    Negatives are drawn with probability proportional to q(d)^-1 [d < cutoff_nonzero], where
    q(d) ~ d^(n-2) (1 - d^2 / 4)^((n-3)/2) is the density of distances between uniform points on
    the sphere and d is clamped below at ``cutoff``. pytorch-metric-learning's miner takes n from
    the embedding's width; here ``dimension`` gives it (None: the width, the same as PML's).
    """

    def __init__(self, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4, dimension: int | None = None, **kwargs):
        super().__init__(cutoff=cutoff, nonzero_loss_cutoff=nonzero_loss_cutoff, **kwargs)
        self.dimension = None if dimension is None else int(dimension)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        n = float(self.dimension or embeddings.size(1))
        dist = torch.clamp(self.distance(embeddings, ref_emb), min=self.cutoff)
        log_weights = (2.0 - n) * torch.log(dist) - ((n - 3.0) / 2.0) * torch.log(1.0 - 0.25 * dist**2)
        bad = ~torch.isfinite(log_weights)
        negative = (labels[:, None] != ref_labels[None, :]).to(log_weights.dtype)
        log_weights = log_weights * negative
        weights = torch.exp(log_weights - log_weights[~bad].max())
        weights = weights * negative * (dist < self.nonzero_loss_cutoff).to(weights.dtype)
        weights[bad] = 0
        weights = weights / weights.sum(dim=1, keepdim=True)
        return lmu.get_random_triplet_indices(labels, ref_labels=ref_labels, weights=weights)
