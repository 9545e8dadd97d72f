"""The uncertainty head of introspective similarity (IDML, Wang et al. 2023, Sec. 3.2).

Beside the semantic embedding of the global head, a second linear layer maps the same pooled
feature (average + max pooling in the paper's setting, ``model.pooling: avgmax``) to an
uncertainty embedding u. u is deliberately NOT L2-normalised: the original release normalised
it, which makes ``||u||`` the same for every image and the uncertainty term a constant.
"""

from __future__ import annotations

import torch
from torch import nn

from glassmetric.errors import ConfigError
from glassmetric.models.output import EmbeddingOutput


class UncertaintyHead(nn.Module):
    """Pooled feature (B, C) -> ``uncertainty`` (B, Du), un-normalised.

    The weights start small (normal, std ``init_std``; zero bias): with Kaiming-sized weights
    the uncertainty distances of an untrained model are in the hundreds, the shrink factor
    exp(-(beta + b_0) / (a_s alpha)) saturates at 0 for every pair and no gradient flows. Not
    zero either: where all u are equal, the gradient with respect to u vanishes.
    """

    def __init__(self, in_channels: int, uncertainty_dim: int, init_std: float = 1e-3):
        super().__init__()
        if int(in_channels) <= 0 or int(uncertainty_dim) <= 0:
            raise ConfigError(
                f"model.uncertainty_dim: expected a positive size (and positive input channels), "
                f"got {uncertainty_dim} from {in_channels} channels"
            )
        self.linear = nn.Linear(int(in_channels), int(uncertainty_dim))
        nn.init.normal_(self.linear.weight, std=float(init_std))
        nn.init.zeros_(self.linear.bias)

    def forward(self, feature_map: torch.Tensor, pooled: torch.Tensor, output: EmbeddingOutput) -> dict:
        return {"uncertainty": self.linear(pooled)}
