"""Spatial embeddings for structural matching (DIML, Zhao et al. 2021, Sec. 3.2).

The embedding layer is applied at every location of the feature map, the result is resampled
to a g x g grid (bilinear up to 4g x 4g, then adaptive average pooling to g x g, as the DIML
code does, so every grid cell summarises the same share of the image for any feature-map
size), and each cell is L2-normalised (:func:`feature_map_to_grid`, public for any backbone):

    x_i = normalise(pool_g(W f_p + b))_i,   i = 1 .. g*g

The resampling is linear with weights that sum to one per cell, so ``pool_g(W f + b) = W
pool_g(f) + b``: when the grid has fewer cells than the feature map has locations (4 x 4 cells
from a 7 x 7 map), the head resamples the features first and applies W at the g*g cells only.

Two ways to get W:

* ``SpatialGridHead.sharing(global_head)`` reuses the linear layer of the global head of an
  existing checkpoint: no new parameters, no retraining (the training-free DIML of the paper).
* ``SpatialGridHead(in_channels, dim)`` owns a 1x1 convolution, trained by a structural loss.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from glassmetric.errors import ConfigError
from glassmetric.models.global_head import GlobalHead
from glassmetric.models.output import EmbeddingOutput


def feature_map_to_grid(feature_map: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """Per-location embeddings ``(B, D, h, w)`` -> ``(B, grid*grid, D)`` L2-normalised grid cells.

    DIML's resampling (Zhao et al. 2021, Sec. 3.2): bilinear up to ``4 grid x 4 grid``
    (``align_corners=False``), adaptive average pooling to ``grid x grid`` (exact 4 x 4 block
    means), cells in row-major order, each L2-normalised (an all-zero cell stays zero). Every
    cell summarises the same share of the image whatever ``h x w`` is.

    The training-free DIML recipe with any backbone and the linear embedding layer of its global
    head (average pooling), e.g. ResNet-50 layer4 (2048 x 7 x 7 at 224 px)::

        fmap = backbone(images)                                   # (B, C, h, w)
        glob = F.normalize(head(fmap.mean((2, 3))), dim=-1)       # (B, D)
        per_location = F.linear(fmap.movedim(1, -1), head.weight, head.bias).movedim(-1, 1)
        local = feature_map_to_grid(per_location, 4)              # (B, 16, D)
        ss = structural_similarity(local[0], local[1:], glob[0], glob[1:])  # image 0 vs the rest
    """
    if feature_map.ndim != 4:
        raise ValueError(f"feature_map must be (B, D, h, w), got {tuple(feature_map.shape)}")
    if not (isinstance(grid, int) and grid >= 1):
        raise ValueError(f"grid must be an integer >= 1, got {grid!r}")
    up = F.interpolate(feature_map, size=(4 * grid, 4 * grid), mode="bilinear", align_corners=False)
    cells = F.adaptive_avg_pool2d(up, grid)
    return F.normalize(cells.flatten(2).transpose(1, 2), dim=-1)


@lru_cache(maxsize=32)
def _grid_weights(h: int, w: int, grid: int) -> torch.Tensor:
    """The ``(grid*grid, h*w)`` matrix of :func:`feature_map_to_grid`'s resampling (before the
    normalisation): cell i = sum_p weights[i, p] f_p; every row sums to one."""
    basis = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w)
    up = F.interpolate(basis, size=(4 * grid, 4 * grid), mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(up, grid).view(h * w, grid * grid).T.contiguous()


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
        _, _, h, w = feature_map.shape
        if self.grid * self.grid >= h * w:  # as many cells as locations or more: project first
            return {"local": feature_map_to_grid(self.project(feature_map), self.grid)}
        weights = _grid_weights(h, w, self.grid).to(feature_map)
        cells = torch.einsum("gp,bcp->bgc", weights, feature_map.flatten(2))  # (B, g*g, C): resampled first
        if self._shared is None:
            assert self.conv is not None  # built when no head is shared
            weight, bias = self.conv.weight.flatten(1), self.conv.bias
        else:
            weight, bias = self._shared[0].linear.weight, self._shared[0].linear.bias
        return {"local": F.normalize(F.linear(cells, weight, bias), dim=-1)}

    def extra_repr(self) -> str:
        return f"grid={self.grid}, {'shares the global head' if self._shared else 'own 1x1 conv'}"
