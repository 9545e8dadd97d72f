"""Figures of introspective uncertainty (IDML) for people: which images does the model doubt?

:func:`uncertainty_grid_figure` shows the most and the least uncertain images of a data set,
each tile the photo at its own resolution with its uncertainty ``||u||`` and a frame saying
whether its nearest neighbour is of the same class (blue, a tick) or of another (orange, a
cross; a colour-blind-safe pair), so a reader sees at once whether doubt goes with failure.
Object-oriented Matplotlib only (no pyplot), like :mod:`glassmetric.explain.figures`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from glassmetric.explain.overlays import add_caption, picture

HIT, MISS = "#2166ac", "#e66101"


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
    """Two blocks of tiles: the most uncertain images on top, the least uncertain below.

    Images: PIL images or arrays (drawn at their own resolution), or
    :class:`~glassmetric.explain.frames.FramedImage` originals. ``fig.axes`` holds one axes per
    tile slot, row by row (unused slots switched off).
    """
    blocks = [
        ("most uncertain", images_most, values_most, correct_most),
        ("least uncertain", images_least, values_least, correct_least),
    ]
    rows_of = [max(1, -(-len(b[1]) // columns)) for b in blocks]
    fig = Figure(figsize=(2.0 * columns + 0.6, 2.15 * sum(rows_of) + 1.2), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(sum(rows_of), columns)
    row0 = 0
    for (name, images, values, correct), rows in zip(blocks, rows_of, strict=True):
        for k in range(rows * columns):
            ax = fig.add_subplot(grid[row0 + k // columns, k % columns])
            ax.set_xticks([])
            ax.set_yticks([])
            if k >= len(images):
                ax.set_axis_off()
                continue
            pic = picture(images[k], f"{name} image {k}")
            ax.imshow(pic.pixels, extent=(0, pic.width, pic.height, 0), interpolation="antialiased")
            colour = HIT if correct[k] else MISS
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
            mark = "\u2713" if correct[k] else "\u2717"
            ax.set_title(f"{mark} u = {values[k]:.3g}", fontsize=10, color=colour, fontweight="bold")
            if k % columns == 0:
                ax.set_ylabel(name if k == 0 else "", fontsize=11, fontweight="bold")
        row0 += rows
    fig.suptitle(title or "uncertainty ||u|| of the most and the least uncertain images", fontsize=13)
    add_caption(
        fig,
        "u = the norm of the image's uncertainty embedding; blue \u2713: its nearest neighbour is of the same "
        "class, orange \u2717: of another",
    )
    return fig
