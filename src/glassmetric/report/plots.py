"""The K-sweep of structural re-ranking as a figure: each metric's change against the global
ranking (K = 0), in points, over the shortlist size K."""

from __future__ import annotations

from collections.abc import Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from glassmetric.retrieval.metrics import _short_name

__all__ = ["SWEEP_METRICS", "sweep_figure"]

#: the metrics drawn, when the sweep has them (the table beside the figure has them all)
SWEEP_METRICS = ("recall@1", "r_precision", "map_at_r")


def sweep_figure(sweep: Mapping[int, Mapping[str, float]]) -> Figure:
    """One line per metric: ``100 * (metric at K - metric at K = 0)`` over K, so 0 (the global
    ranking) is the dashed line across; the y axis spans the changes (at least +-0.5 points)."""
    ks = sorted(sweep)
    base = sweep[0] if 0 in sweep else sweep[ks[0]]
    metrics = [m for m in SWEEP_METRICS if m in base] or list(base)
    fig = Figure(figsize=(7.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positions = list(range(len(ks)))  # evenly spaced: K grows roughly geometrically
    changes = []
    for i, m in enumerate(metrics):
        values = [100 * (sweep[k][m] - base[m]) for k in ks]
        changes += [v for v in values if v == v]
        ax.plot(positions, values, marker="o", color=f"C{i}", label=f"\u0394 {_short_name(m)}")
    ax.axhline(0, color="0.3", lw=0.9, ls="--")
    low, high = min(changes, default=0.0), max(changes, default=0.0)
    pad = max(0.15 * (high - low), 0.1)
    ax.set_ylim(min(low - pad, -0.5), max(high + pad, 0.5))
    ax.set_xticks(positions, [f"K={k}" if k else "K=0\n(global)" for k in ks])
    ax.set_ylabel("change against the global ranking (points)")
    ax.set_title("structural re-ranking of the global top-K: change of each metric", fontsize=10)
    ax.grid(color="0.9")
    ax.legend(fontsize=8, ncols=min(3, len(metrics)), loc="best")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig
