"""The K-sweep of structural re-ranking as a figure: each metric against the shortlist size K."""

from __future__ import annotations

from collections.abc import Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from glassmetric.retrieval.metrics import _short_name

__all__ = ["sweep_figure"]


def sweep_figure(sweep: Mapping[int, Mapping[str, float]]) -> Figure:
    """One line per metric (in percent) over K; K = 0 is the global ranking, drawn dashed across."""
    ks = sorted(sweep)
    metrics = list(next(iter(sweep.values())))
    fig = Figure(figsize=(7.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positions = list(range(len(ks)))  # evenly spaced: K grows roughly geometrically
    for i, m in enumerate(metrics):
        colour = f"C{i}"
        values = [100 * sweep[k][m] for k in ks]
        ax.plot(positions, values, marker="o", color=colour, label=_short_name(m))
        if 0 in sweep:
            ax.axhline(100 * sweep[0][m], color=colour, lw=0.8, ls="--", alpha=0.6)
    ax.set_xticks(positions, [f"K={k}" if k else "K=0\n(global)" for k in ks])
    ax.set_ylabel("%")
    ax.set_title("structural re-ranking of the global top-K (dashed: global ranking)", fontsize=10)
    ax.grid(color="0.9")
    ax.legend(fontsize=8, ncols=min(4, len(metrics)), loc="best")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig
