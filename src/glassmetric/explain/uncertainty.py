"""Figures of introspective uncertainty (IDML) for people: which images does the model doubt?

:func:`uncertainty_grid_figure` shows the most and the least uncertain images of a data set,
each tile with its uncertainty ``||u||`` and a green (nearest neighbour of the same class) or
red (of another class) frame, so a reader sees at once whether doubt goes with failure.
Object-oriented Matplotlib only (no pyplot), like :mod:`glassmetric.explain.figures`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from glassmetric.explain.figures import _as_image

HIT, MISS = "#1a9850", "#d73027"


def extremes(uncertainty: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``n`` most uncertain images (most first) and the ``n`` least (least first)."""
    order = np.argsort(np.asarray(uncertainty), kind="stable")
    n = min(n, len(order) // 2) if len(order) > 1 else len(order)
    return order[::-1][:n], order[:n]


def uncertainty_grid_figure(
    images_most: Sequence,
    values_most: Sequence[float],
    correct_most: Sequence[bool],
    images_least: Sequence,
    values_least: Sequence[float],
    correct_least: Sequence[bool],
    *,
    columns: int = 6,
    title: str | None = None,
) -> Figure:
    """Two blocks of tiles: the most uncertain images on top, the least uncertain below."""
    blocks = [
        ("most uncertain", images_most, values_most, correct_most),
        ("least uncertain", images_least, values_least, correct_least),
    ]
    rows_of = [max(1, -(-len(b[1]) // columns)) for b in blocks]
    fig = Figure(figsize=(2.0 * columns, 2.25 * sum(rows_of) + 0.8))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(sum(rows_of), columns, hspace=0.45, wspace=0.08)
    row0 = 0
    for (name, images, values, correct), rows in zip(blocks, rows_of, strict=True):
        for k in range(rows * columns):
            ax = fig.add_subplot(grid[row0 + k // columns, k % columns])
            ax.set_xticks([])
            ax.set_yticks([])
            if k >= len(images):
                ax.set_axis_off()
                continue
            ax.imshow(_as_image(images[k], f"{name} image {k}"))
            colour = HIT if correct[k] else MISS
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
            ax.set_title(f"u = {values[k]:.3g}", fontsize=10, color=colour)
            if k == 0:
                ax.set_ylabel(name, fontsize=11, fontweight="bold")
        row0 += rows
    fig.suptitle(
        title or "uncertainty ||u||: green = nearest neighbour of the same class, red = of another", fontsize=12
    )
    return fig
