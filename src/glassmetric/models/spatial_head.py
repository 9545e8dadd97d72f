"""Spatial embeddings for structural matching (DIML, Zhao et al. 2021, Sec. 3.2).

The embedding layer is applied at every location of the feature map, the result is resampled
to a g x g grid (bilinear up to 4g x 4g, then adaptive average pooling to g x g, as the DIML
code does, so every grid cell summarises the same share of the image for any feature-map
size), and each cell is L2-normalised:

    x_i = normalise(pool_g(W f_p + b))_i,   i = 1 .. g*g

Two ways to get W:

* ``SpatialGridHead.sharing(global_head)`` reuses the linear layer of the global head of an
  existing checkpoint: no new parameters, no retraining (the training-free DIML of the paper).
* ``SpatialGridHead(in_channels, dim)`` owns a 1x1 convolution, trained by a structural loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glassmetric.errors import ConfigError
from glassmetric.models.global_head import GlobalHead
from glassmetric.models.heads import GROUPING, SPATIAL
from glassmetric.models.output import EmbeddingOutput


def resample_to_grid(local: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, D, h, w) -> (B, D, grid, grid): bilinear up to 4*grid, then adaptive average pooling."""
    up = F.interpolate(local, size=(4 * grid, 4 * grid), mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(up, grid)


class SpatialGridHead(nn.Module):
    """Feature map -> ``local``: (B, grid*grid, D) L2-normalised cell embeddings, row-major cells."""

    def __init__(self, in_channels: int, embedding_dim: int, grid: int = 4, *, share: GlobalHead | None = None):
        super().__init__()
        if grid < 1:
            raise ConfigError(f"model.spatial.grid: expected >= 1, got {grid}")
        self.grid = grid
        self.conv = nn.Conv2d(in_channels, embedding_dim, kernel_size=1) if share is None else None
        # a tuple, so the shared head is not registered and its weights are not duplicated
        self._shared = (share,) if share is not None else None

    @classmethod
    def sharing(cls, head: GlobalHead, grid: int = 4) -> SpatialGridHead:
        """A grid head that applies ``head``'s linear layer at every location (no own weights)."""
        return cls(head.in_channels, head.embedding_dim, grid, share=head)

    def project(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, D, h, w): the embedding layer at every location."""
        if self._shared is None:
            assert self.conv is not None  # built when no head is shared
            return self.conv(feature_map)
        linear = self._shared[0].linear
        return F.linear(feature_map.movedim(1, -1), linear.weight, linear.bias).movedim(-1, 1)

    def forward(self, feature_map: torch.Tensor, pooled: torch.Tensor, output: EmbeddingOutput) -> dict:
        grid = resample_to_grid(self.project(feature_map), self.grid)
        return {"local": F.normalize(grid.flatten(2).transpose(1, 2), dim=-1)}

    def extra_repr(self) -> str:
        return f"grid={self.grid}, {'shares the global head' if self._shared else 'own 1x1 conv'}"


def ensure_spatial_head(model, grid: int = 4) -> SpatialGridHead:
    """The model's spatial head; if it has none, add the training-free one sharing its global head.

    A model with attentive groups and no spatial head has no trained per-location embedding
    (its global head is replaced by the groups and left untrained): that is a ConfigError.
    """
    if SPATIAL not in model.extra_heads:
        if GROUPING in model.extra_heads:
            raise ConfigError(
                "structural matching on a model.groups checkpoint needs its own trained spatial head: "
                "train with model.spatial_grid=4 model.spatial_head=own loss.similarity=structural"
            )
        model.add_head(SPATIAL, SpatialGridHead.sharing(model.head, grid))
    return model.extra_heads[SPATIAL]
