"""Figures that explain a structural (DIML) or a grouping (DGML, :func:`group_pair_figure`) match
to a person.

:func:`structural_pair_figure` draws why two images were judged alike by the structural
similarity of :mod:`glassmetric.similarity.structural`:

* the two images side by side, each covered by its ``g x g`` grid of cells (row-major, the grid
  stretched over the whole image as the model saw it), with the marginals ``mu`` (query cells)
  and ``nu`` (candidate cells) as a semi-transparent heat map;
* the strongest flows ``T_ij`` of the transport plan as lines from the centre of cell ``i`` of
  the query to the centre of cell ``j`` of the candidate, width proportional to ``T_ij``, colour
  by the cell similarity ``S_ij``;
* a bar chart of what each query cell contributes to ``SS`` (``sum_j T_ij S_ij``), sorted;
* the global cosine, ``SS`` and the multi-scale score in the title.

Only the object-oriented Matplotlib API is used (a :class:`matplotlib.figure.Figure` on an Agg
canvas, never ``pyplot``), so figures can be made from several threads at once (a web server).

Layout of the returned figure: ``fig.axes`` is ``[pair, contributions, mass colour bar,
similarity colour bar]``. The flow lines are one :class:`~matplotlib.collections.LineCollection`
on the pair axes with gid :data:`FLOWS_GID`, segments drawn weakest first (the strongest on top).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from glassmetric.similarity.structural import StructuralExplanation

__all__ = [
    "FLOWS_GID",
    "cell_centres",
    "cell_labels",
    "format_scores",
    "group_pair_figure",
    "save_figure",
    "structural_pair_figure",
    "top_flows_of",
]

#: gid of the LineCollection holding the flow lines of :func:`structural_pair_figure`
FLOWS_GID = "structural-flows"

_MASS_CMAP = "magma"
_SIM_CMAP = "coolwarm"
_HEAT_ALPHA = 0.35  # light enough to see the image through the cell masses
_MAX_LINEWIDTH = 7.0
_MIN_LINEWIDTH = 0.4
_GAP = 0.16  # horizontal gap between the two images, in units of the image height


def cell_centres(grid: int, width: float, height: float) -> np.ndarray:
    """Centres of the ``grid x grid`` cells stretched over a ``width x height`` image.

    Returns ``(grid*grid, 2)`` float64 ``(x, y)`` coordinates, cells row-major (cell
    ``i = row * grid + col``): ``x = (col + 0.5) * width / grid``, ``y = (row + 0.5) * height / grid``,
    with ``(0, 0)`` the top-left corner of the image (pixel-edge coordinates, as ``imshow`` with
    ``extent=(0, width, height, 0)`` draws it).
    """
    if int(grid) != grid or grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid!r}")
    if not (width > 0 and height > 0):
        raise ValueError(f"width and height must be positive, got {width!r} x {height!r}")
    grid = int(grid)
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    return np.stack([(cols + 0.5) * (width / grid), (rows + 0.5) * (height / grid)], axis=1).astype(np.float64)


def cell_labels(grid: int, part_names: Sequence[str] | Mapping[Any, str] | None = None) -> list[str]:
    """One label per cell (row-major): ``"(row, col)"``, or its part name when one is given.

    ``part_names`` is either a sequence of ``grid*grid`` names, or a mapping from a cell index
    ``i`` or a ``(row, col)`` pair to a name (cells it leaves out keep ``"(row, col)"``).
    """
    n = grid * grid
    labels = [f"({i // grid}, {i % grid})" for i in range(n)]
    if part_names is None:
        return labels
    if isinstance(part_names, Mapping):
        for key, name in part_names.items():
            if isinstance(key, tuple):
                r, c = key
                if not (0 <= r < grid and 0 <= c < grid):
                    raise ValueError(f"part_names: cell {key} is outside the {grid}x{grid} grid")
                i = r * grid + c
            else:
                i = int(key)
                if not 0 <= i < n:
                    raise ValueError(f"part_names: cell {key} is outside the {grid}x{grid} grid")
            labels[i] = str(name)
        return labels
    if isinstance(part_names, str) or len(part_names) != n:
        raise ValueError(
            f"part_names must name all {n} cells (or be a mapping), got "
            f"{part_names if isinstance(part_names, str) else len(part_names)!r}"
        )
    return [str(p) for p in part_names]


def _scalar(t) -> float:
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if t.numel() != 1:
            raise ValueError(f"expected a single pair's explanation, got a score of shape {tuple(t.shape)}")
        return float(t.reshape(()).item())
    a = np.asarray(t, dtype=np.float64)
    if a.size != 1:
        raise ValueError(f"expected a single pair's explanation, got a score of shape {a.shape}")
    return float(a.reshape(()))


def _array(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu().double().numpy()
    return np.asarray(t, dtype=np.float64)


def _signed(v: float) -> str:
    v = round(v, 2) + 0.0  # no "-0.00"
    return f"{v:.2f}" if v >= 0 else f"({v:.2f})"


def format_scores(explanation: StructuralExplanation) -> str:
    """``"global 0.71 + structural 0.64 = score 1.35"`` from the explanation's own fields.

    (A negative term is written in parentheses; the displayed terms are rounded separately, so
    their sum may differ from the rounded score in the last digit.)
    """
    g, ss, score = (_scalar(explanation.s_global), _scalar(explanation.ss), _scalar(explanation.score))
    return f"global {_signed(g)} + structural {_signed(ss)} = score {_signed(score)}"


def top_flows_of(T: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the ``min(k, #nonzero)`` largest entries of ``T``, largest first.

    Ties keep row-major order (stable sort).
    """
    if k < 0:
        raise ValueError(f"top_flows must be >= 0, got {k}")
    T = np.asarray(T)
    flat = T.ravel()
    order = np.argsort(-flat, kind="stable")
    order = order[flat[order] > 0][:k]
    return np.divmod(order, T.shape[1])


def _as_image(image, name: str) -> np.ndarray:
    """PIL image or HxW / HxWx3 / HxWx4 array (uint8, or float in [0, 1]) -> array for imshow."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return arr
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=-1)
    raise ValueError(f"{name} must be a PIL image or an HxWx3 array, got shape {arr.shape}")


def _grid_of(n: int, side: str) -> int:
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{side} has {n} cells, which is not a square g x g grid")
    return g


def _arcs(start: np.ndarray, end: np.ndarray, points: int = 24) -> np.ndarray:
    """Gently curved paths (quadratic Bezier curves) from each ``start`` to each ``end``.

    Straight lines between cells at the same height would lie on top of one another; each
    curve bulges by 8% of its length towards the vertical middle of the images (height 1),
    so flows stay inside the picture and flows of one row are told apart by their heights.
    Returns ``(F, points, 2)``.
    """
    if len(start) == 0:
        return np.zeros((0, points, 2))
    mid = (start + end) / 2
    length = np.linalg.norm(end - start, axis=1)
    direction = np.where(mid[:, 1] < 0.5, 1.0, -1.0)  # y grows downwards
    control = mid + np.stack([np.zeros_like(length), direction * 0.16 * length], axis=1)
    t = np.linspace(0.0, 1.0, points)[None, :, None]
    return (1 - t) ** 2 * start[:, None] + 2 * (1 - t) * t * control[:, None] + t**2 * end[:, None]


def structural_pair_figure(
    image_x,
    image_y,
    explanation: StructuralExplanation,
    *,
    top_flows: int = 12,
    titles: tuple[str, str] = ("query", "candidate"),
    part_names: Sequence[str] | Mapping[Any, str] | None = None,
    notes: tuple[str, str] | None = None,
) -> Figure:
    """The figure that explains why ``image_x`` and ``image_y`` were judged alike.

    Args:
        image_x, image_y: the two images as they entered the model (PIL images or ``HxWx3``
            uint8 arrays, already centre-cropped); the cell grid covers each whole image, so
            non-square images stretch the grid.
        explanation: :func:`glassmetric.similarity.structural.explain_pair` of the pair (x
            first), for ONE pair: ``S``/``T`` of shape ``(N, M)`` with ``N`` and ``M`` squares.
        top_flows: how many of the largest transport flows ``T_ij`` to draw (fewer when ``T``
            has fewer nonzero entries; 0 draws none).
        titles: names of the two images.
        notes: a short note written after each image's title (e.g. its uncertainty).
        part_names: names for the query's cells in the bar chart, a sequence of ``N`` names or a
            mapping from a cell index / ``(row, col)`` to a name (see :func:`cell_labels`).

    Returns:
        A :class:`matplotlib.figure.Figure` on an Agg canvas (no pyplot state); save it with
        :func:`save_figure`. Axes: ``[pair, contributions, mass colour bar, similarity colour bar]``.
    """
    S, T = _array(explanation.S), _array(explanation.T)
    if S.ndim != 2 or T.shape != S.shape:
        raise ValueError(f"expected one pair's explanation with S and T of shape (N, M), got S {S.shape}, T {T.shape}")
    mu, nu = _array(explanation.mu).reshape(-1), _array(explanation.nu).reshape(-1)
    contrib_x = _array(explanation.region_contribution_x).reshape(-1)
    n, m = S.shape
    if mu.size != n or nu.size != m or contrib_x.size != n:
        raise ValueError("explanation fields disagree in their number of cells")
    gx, gy = _grid_of(n, "the query (rows of S)"), _grid_of(m, "the candidate (columns of S)")
    labels = cell_labels(gx, part_names)
    ss = _scalar(explanation.ss)
    img_x, img_y = _as_image(image_x, "image_x"), _as_image(image_y, "image_y")
    rows, cols = top_flows_of(T, int(top_flows))

    # ---- layout: both images on one axes, each scaled to height 1 (aspect kept)
    wx = img_x.shape[1] / img_x.shape[0]
    wy = img_y.shape[1] / img_y.shape[0]
    x0_y = wx + _GAP
    total_w = x0_y + wy

    fig = Figure(figsize=(min(max(9.0, 2.2 + 4.6 * total_w), 18.0), 9.2), layout="constrained")
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 1, height_ratios=[3.0, 1.45])
    ax = fig.add_subplot(gs[0])
    axb = fig.add_subplot(gs[1])

    ext_x = (0.0, wx, 1.0, 0.0)
    ext_y = (x0_y, x0_y + wy, 1.0, 0.0)
    ax.imshow(img_x, extent=ext_x, interpolation="antialiased")
    ax.imshow(img_y, extent=ext_y, interpolation="antialiased")
    mass_norm = Normalize(0.0, max(float(mu.max()), float(nu.max()), 1e-12))
    heat_kw: dict[str, Any] = {"cmap": _MASS_CMAP, "norm": mass_norm, "alpha": _HEAT_ALPHA, "interpolation": "nearest"}
    heat = ax.imshow(mu.reshape(gx, gx), extent=ext_x, **heat_kw)
    ax.imshow(nu.reshape(gy, gy), extent=ext_y, **heat_kw)

    # cell grid and row / column indices
    grid_style: dict[str, Any] = {"color": "white", "lw": 0.6, "alpha": 0.55}
    # row indices left of the query and right of the candidate, clear of the flows in the gap
    for x0, w, g, left in ((0.0, wx, gx, True), (x0_y, wy, gy, False)):
        for k in range(1, g):
            ax.plot([x0 + w * k / g] * 2, [0, 1], **grid_style)
            ax.plot([x0, x0 + w], [k / g] * 2, **grid_style)
        fs = 8 if g <= 8 else 6
        for k in range(g):
            ax.text(x0 + w * (k + 0.5) / g, -0.012, str(k), ha="center", va="bottom", fontsize=fs, color="0.35")
            ax.text(
                x0 - 0.012 if left else x0 + w + 0.012,
                (k + 0.5) / g,
                str(k),
                ha="right" if left else "left",
                va="center",
                fontsize=fs,
                color="0.35",
            )
    for (x0, w), title, g, note in (
        ((0.0, wx), titles[0], gx, (notes or ("", ""))[0]),
        ((x0_y, wy), titles[1], gy, (notes or ("", ""))[1]),
    ):
        ax.text(
            x0 + w / 2,
            -0.06,
            f"{title}  ({g}x{g} cells)" + (f", {note}" if note else ""),
            ha="center",
            va="bottom",
            fontsize=12,
            fontweight="bold",
        )

    # flow lines (weakest first, so the strongest are drawn on top)
    cx = cell_centres(gx, wx, 1.0)
    cy = cell_centres(gy, wy, 1.0) + np.array([x0_y, 0.0])
    s_lim = max(float(np.abs(S).max()), 1e-6)
    sim_norm = Normalize(-s_lim, s_lim)
    t_top = T[rows, cols]
    order = np.arange(len(rows))[::-1]
    segments = _arcs(cx[rows[order]], cy[cols[order]])
    widths = np.maximum(_MAX_LINEWIDTH * t_top[order] / t_top.max(), _MIN_LINEWIDTH) if len(rows) else np.zeros(0)
    flows = LineCollection(
        segments,  # type: ignore[arg-type]  # an (F, points, 2) array works; matplotlib's stubs ask for a Sequence
        linewidths=widths,
        cmap=_SIM_CMAP,
        norm=sim_norm,
        capstyle="round",
        zorder=4,
    )
    flows.set_array(S[rows[order], cols[order]] if len(rows) else np.zeros(0))
    flows.set_gid(FLOWS_GID)
    ax.add_collection(flows)
    if len(rows):
        # a black outline 1.6 pt wider than each line keeps it visible on any background
        outline = LineCollection(
            segments,  # type: ignore[arg-type]  # an (F, points, 2) array works; matplotlib's stubs ask for a Sequence
            linewidths=widths + 1.6,
            colors="black",
            capstyle="round",
            zorder=3.9,
            alpha=0.8,
        )
        ax.add_collection(outline)
        ends = np.concatenate([cx[np.unique(rows)], cy[np.unique(cols)]])
        ax.scatter(ends[:, 0], ends[:, 1], s=16, c="white", edgecolors="black", linewidths=0.8, zorder=5)

    ax.set_xlim(-0.05, total_w + 0.05)
    ax.set_ylim(1.0 + 0.01, -0.1)
    ax.set_aspect("equal")
    ax.set_axis_off()
    shown_mass = float(t_top.sum())
    ax.set_title(
        f"lines: the {len(rows)} strongest of {n * m} flows $T_{{ij}}$ (width $\\propto T_{{ij}}$, "
        f"carrying {100 * shown_mass:.0f}% of the transport mass); "
        f"heat: cell mass $\\mu_i$ / $\\nu_j$",
        fontsize=9.5,
        color="0.25",
        pad=10,
    )
    cb_mass = fig.colorbar(heat, ax=ax, location="right", shrink=0.85, pad=0.01, fraction=0.035)
    cb_mass.set_label(r"cell mass $\mu_i$, $\nu_j$ (uniform $= 1/N$ dashed)", fontsize=9)
    cb_mass.ax.axhline(1.0 / n, color="deepskyblue", lw=1.5, ls="--")
    cb_sim = fig.colorbar(flows, ax=ax, location="right", shrink=0.85, pad=0.01, fraction=0.035)
    cb_sim.set_label(r"cell similarity $S_{ij}$", fontsize=9)
    for cb in (cb_mass, cb_sim):
        cb.ax.tick_params(labelsize=8)

    # ---- contributions of the query's cells to SS
    idx = np.argsort(-contrib_x, kind="stable")
    vals = contrib_x[idx]
    colours = np.where(vals >= 0, "#2a7f9e", "#d9603b")
    pos = np.arange(n)
    axb.bar(pos, vals, color=colours, width=0.8, zorder=2)
    axb.axhline(0.0, color="0.3", lw=0.8, zorder=3)
    many = n > 16
    axb.set_xticks(pos, [labels[i] for i in idx], rotation=90 if many else 0, fontsize=7 if many else 8.5)
    axb.set_xlim(-0.7, n - 0.3)
    axb.set_ylabel("contribution to SS\n" + r"$\Sigma_j\, T_{ij} S_{ij}$", fontsize=9)
    axb.tick_params(axis="y", labelsize=8)
    axb.grid(axis="y", color="0.88", zorder=0)
    for side in ("top", "right"):
        axb.spines[side].set_visible(False)
    if not many:
        span = float(np.abs(vals).max()) or 1.0
        for p, v in zip(pos, vals, strict=True):
            if abs(v) < 0.01 * span:  # labels of invisible bars would only clutter
                continue
            axb.text(
                float(p),
                v + (0.02 if v >= 0 else -0.02) * span,
                f"{v:.2g}",
                ha="center",
                va="bottom" if v >= 0 else "top",
                fontsize=7,
                color="0.25",
            )
        axb.margins(y=0.12)
    if abs(ss) >= 1e-12 and np.all(vals * np.sign(ss) >= 0):
        share = f", top 3 cells: {100 * float(vals[:3].sum()) / ss:.0f}% of it"
    elif np.any(vals * np.sign(ss) < 0):
        share = f"; {'orange' if ss >= 0 else 'blue'} bars pull it towards 0"
    else:
        share = ""
    axb.set_title(
        f"what each {titles[0]} cell contributes to the structural score "
        f"(bars sum to SS = {round(ss, 2) + 0.0:.2f}{share})",
        fontsize=10,
        loc="left",
    )

    fig.suptitle(format_scores(explanation), fontsize=15, fontweight="bold")
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (PNG unless the suffix names another format Matplotlib writes),
    creating missing parent directories; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".").lower() or "png"
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format=fmt, facecolor="white")
    return path


# ---------------------------------------------------------------------------- attentive grouping

_ATT_CMAP = "jet"
_ATT_ALPHA = 0.45


def _attention_panel(ax, img: np.ndarray, amap: np.ndarray, vmax: float, marker_size: float = 12):
    """``img`` with one attention map bilinearly upsampled over it and its peak marked; returns the heat image."""
    h, w = img.shape[:2]
    ax.imshow(img, extent=(0, w, h, 0))
    heat = ax.imshow(
        amap, extent=(0, w, h, 0), cmap=_ATT_CMAP, alpha=_ATT_ALPHA, interpolation="bilinear", vmin=0.0, vmax=vmax
    )
    r, c = np.unravel_index(int(np.argmax(amap)), amap.shape)
    ax.plot(
        (c + 0.5) * w / amap.shape[1],
        (r + 0.5) * h / amap.shape[0],
        marker="+",
        color="white",
        markersize=marker_size,
        mew=2.5,
    )
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    return heat


def group_attention_grid_figure(images, attention, *, titles=None, group_parts=None) -> Figure:
    """Where each attention group looks, on several images: one row per image, the image then
    one panel per group (its map over the image, peak marked), every map on one colour scale.

    Args:
        images: a sequence of images (PIL, arrays or CHW tensors) the maps were computed on.
        attention: ``(n, k, h, w)`` attention maps (each sums to 1 over positions).
        titles: optional per-image labels (left column); group_parts: optional per-group
            column headings, e.g. the part each group most often peaks on.

    Axes: ``fig.axes`` is ``[image 1, group 1 .. k, image 2, ...]`` plus the colour bar.
    """
    att = _array(attention)
    if att.ndim != 4 or att.shape[0] != len(images):
        raise ValueError(f"attention must be (n={len(images)}, k, h, w), got shape {att.shape}")
    n, k = att.shape[:2]
    fig = Figure(figsize=(1.7 * (k + 1) + 0.8, 1.7 * n + 0.7), layout="constrained")
    FigureCanvasAgg(fig)
    vmax = float(att.max())
    heat = None
    for row in range(n):
        img = _as_image(images[row], f"image {row}")
        ax = fig.add_subplot(n, k + 1, row * (k + 1) + 1)
        ax.imshow(img)
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_ylabel(str(titles[row]), fontsize=8)
        for i in range(k):
            ax = fig.add_subplot(n, k + 1, row * (k + 1) + i + 2)
            heat = _attention_panel(ax, img, att[row, i], vmax, marker_size=8)
            if row == 0:
                head = f"group {i + 1}" + (f"\n({group_parts[i]})" if group_parts is not None else "")
                ax.set_title(head, fontsize=9)
    assert heat is not None  # at least one image and one group
    fig.colorbar(heat, ax=fig.axes, location="right", shrink=0.4, label="attention")
    return fig


def group_pair_figure(image_x, image_y, explanation, *, titles: tuple[str, str] = ("query", "candidate")) -> Figure:
    """The figure that explains a grouping (DGML) match: where each group looked, and what it scored.

    Rows: the two images. Columns: the image, then one panel per group with that group's
    attention map (bilinearly upsampled over the image, its peak marked). Each group's column
    is headed by its cosine between the two images; the bar chart at the bottom shows each
    group's contribution ``cos_i / k``, and the title the sum, the cosine of the concatenated
    embeddings used for ranking.

    Args:
        explanation: a :class:`glassmetric.explain.groups.GroupExplanation` of one pair.

    Axes: ``fig.axes`` is ``[row x: image, group 1 .. k, row y: image, group 1 .. k, bars]``.
    """
    k = explanation.groups
    att = [_array(explanation.attention_x), _array(explanation.attention_y)]
    if att[0].ndim != 3 or att[0].shape[0] != k or att[1].shape[0] != k:
        raise ValueError(f"expected (k={k}, h, w) attention maps, got {att[0].shape} and {att[1].shape}")
    sim = _array(explanation.group_similarity).reshape(-1)
    contrib = _array(explanation.contribution).reshape(-1)
    score = _scalar(explanation.score)
    images = [_as_image(image_x, "image_x"), _as_image(image_y, "image_y")]

    fig = Figure(figsize=(2.3 * (k + 1) + 0.6, 6.9), layout="constrained")
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(3, k + 1, height_ratios=[1.0, 1.0, 0.62])
    vmax = max(float(a.max()) for a in att)
    for row, (img, maps, title) in enumerate(zip(images, att, titles, strict=False)):
        ax = fig.add_subplot(gs[row, 0])
        ax.imshow(img)
        ax.set_title(title, fontsize=10, fontweight="bold")
        ax.set_axis_off()
        for i in range(k):
            ax = fig.add_subplot(gs[row, i + 1])
            heat = _attention_panel(ax, img, maps[i], vmax)
            if row == 0:
                ax.set_title(f"group {i + 1}: cos {_signed(float(sim[i]))}", fontsize=10)
    fig.colorbar(heat, ax=fig.axes[-1], location="right", shrink=0.8, label="attention $a_{ip}$")
    axb = fig.add_subplot(gs[2, :])
    pos = np.arange(k)
    axb.bar(pos, contrib, color=np.where(contrib >= 0, "#2a7f9e", "#d9603b"), width=0.6, zorder=2)
    axb.axhline(0.0, color="0.3", lw=0.8)
    for p, v in zip(pos, contrib, strict=True):
        axb.text(p, v, f"{v:.3f}", ha="center", va="bottom" if v >= 0 else "top", fontsize=9)
    axb.set_xticks(pos, [f"group {i + 1}" for i in range(k)])
    axb.set_ylabel("contribution\n$\\cos_i / k$", fontsize=9)
    axb.grid(axis="y", color="0.88", zorder=0)
    axb.margins(y=0.2)
    for side in ("top", "right"):
        axb.spines[side].set_visible(False)
    axb.set_title(f"each group's share of the score (bars sum to {_signed(score)})", fontsize=10, loc="left")
    parts = " + ".join(_signed(float(s)) for s in sim)
    fig.suptitle(f"score {_signed(score)} = ({parts}) / {k}", fontsize=14, fontweight="bold")
    return fig
