r"""Keypoint transfer through a transport plan, scored by PCK.

A transport plan ``T`` between the ``N = g*g`` cells of image x and those of image y claims a
correspondence; keypoints test it geometrically. A part p visible in both images sits in cell
``c = c_x(p)`` of x; the plan sends that cell's mass over y's cells, so p is predicted at the
flow-weighted mean of the target cells' centres

.. math:: \hat{y}_p = \sum_j \frac{T_{cj}}{\sum_k T_{ck}} \, z_j ,

``z_j`` the centre of cell j of y (in the pixels of y's crop). The prediction is correct when
it lies within ``alpha * max(w, h)`` of p's true position in y, ``(w, h)`` y's bounding box
(PCK@alpha, the usual keypoint-transfer measure, e.g. Han et al., SCNet, 2017, with boxes).

Reference predictors, on the same cells: :func:`nearest_cell_transfer` (p goes to the centre
of the cell of y most similar to its cell, ``argmax_j S_cj``: matching without transport), and
the oracle that puts p at the centre of the cell of y that truly holds it (the best any
cell-level predictor can do at this grid: the quantisation limit). A uniform plan predicts
the centre of the crop for every part.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cell_centre_grid", "nearest_cell_transfer", "oracle_cell_transfer", "pck_hits", "plan_transfer"]


def cell_centre_grid(grid: int, crop: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``(grid*grid, 2)`` x, y centres of the row-major cells of a ``crop x crop`` image."""
    if grid < 1 or crop < 1:
        raise ValueError(f"grid and crop must be positive, got {grid} and {crop}")
    c = (torch.arange(grid, dtype=dtype) + 0.5) * (crop / grid)
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


def _rows(matrix: Tensor, cells_x: Tensor) -> Tensor:
    """``(B, P, M)``: the row of ``matrix`` (B, N, M) of each part's cell (-1 read as 0)."""
    b, _, m = matrix.shape
    cx = cells_x.long().clamp(min=0)
    return matrix.gather(1, cx[:, :, None].expand(b, cx.shape[1], m))


def plan_transfer(plans: Tensor, cells_x: Tensor, centres: Tensor) -> tuple[Tensor, Tensor]:
    """Flow-weighted target position of each part (equation of the module docstring).

    Args:
        plans: ``(B, N, M)`` non-negative plans; cells_x: ``(B, P)`` cell of each part in x
            (-1: invisible); centres: ``(M, 2)`` cell centres of y.

    Returns:
        ``(B, P, 2)`` predicted x, y and ``(B, P)`` bool: a prediction exists (the part is
        visible in x and its cell's row carries mass; a massless row predicts nothing).
    """
    rows = _rows(plans.double(), cells_x)
    mass = rows.sum(-1)
    ok = (cells_x >= 0) & (mass > 0)
    weights = rows / torch.where(ok, mass, torch.ones_like(mass))[..., None]
    return weights @ centres.double(), ok


def nearest_cell_transfer(similarity: Tensor, cells_x: Tensor, centres: Tensor) -> tuple[Tensor, Tensor]:
    """Each part to the centre of the cell of y most similar to its cell (first on ties)."""
    best = _rows(similarity, cells_x).argmax(-1)
    return centres.double()[best], cells_x >= 0


def oracle_cell_transfer(cells_y: Tensor, centres: Tensor) -> tuple[Tensor, Tensor]:
    """Each part to the centre of the cell of y that holds it: the grid's quantisation limit."""
    return centres.double()[cells_y.long().clamp(min=0)], cells_y >= 0


def pck_hits(
    predicted: Tensor, valid: Tensor, keypoints_y: Tensor, box_side_y: Tensor, common: Tensor, alpha: float = 0.1
) -> Tensor:
    """``(B, P)`` float64: 1.0 where the prediction lies within ``alpha * box_side_y`` of the
    true keypoint of y, 0.0 where it does not or no prediction exists, NaN where the part is
    not visible in both images (``common`` False).

    Args:
        predicted: ``(B, P, 2)``; valid: ``(B, P)`` bool; keypoints_y: ``(B, P, >=2)`` true x, y
            in y's crop; box_side_y: ``(B,)`` the larger side of y's box in crop pixels.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    dist = torch.linalg.vector_norm(predicted.double() - keypoints_y[..., :2].double(), dim=-1)
    hit = (valid & (dist <= alpha * box_side_y.double()[:, None])).double()
    return torch.where(common, hit, torch.full_like(hit, float("nan")))
