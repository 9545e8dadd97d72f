"""Figures that explain a structural (DIML) or a grouping (DGML, :func:`group_pair_figure`) match
to a person, readable at a glance.

:func:`structural_pair_figure` draws why two images were judged alike by the structural
similarity ``SS = sum_ij T_ij S_ij`` of :mod:`glassmetric.similarity.structural`:

* both photos at their own resolution, each with the model's ``g x g`` grid of cells (row-major)
  laid over the box its input covers (dashed when the model saw only part of the photo);
* each cell shaded by its share of ``SS`` (``sum_j T_ij S_ij / SS`` for a query cell,
  ``sum_i T_ij S_ij / SS`` for a candidate cell) with a colour whose opacity grows with the
  value (transparent at 0; the scale reaches at least 3x the even share ``1/N``, so an even
  spread leaves the photos nearly clear), the share written in the cell's corner;
* the strongest cell pairs by their contribution ``T_ij S_ij`` as curves from cell ``i`` of the
  query to cell ``j`` of the candidate, width proportional to ``T_ij S_ij``: the fewest that
  carry half of ``SS`` (at most ``top_flows``), the share they carry stated in the title;
* the global cosine, ``SS`` and the multi-scale score on top, one colour bar, and a one-line
  "how to read this" under it.

Only the object-oriented Matplotlib API is used (a :class:`matplotlib.figure.Figure` on an Agg
canvas, never ``pyplot``), so figures can be made from several threads at once (a web server).

Layout of the returned figure: ``fig.axes`` is ``[pair, colour bar]``. The flow lines are one
:class:`~matplotlib.collections.LineCollection` on the pair axes with gid :data:`FLOWS_GID`,
segments drawn weakest first (the strongest on top); the shaded cells are images with gids
``"share-x"`` and ``"share-y"``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from glassmetric.explain.overlays import (
    Picture,
    add_caption,
    alpha_ramp,
    draw_picture,
    picture,
    shade,
)
from glassmetric.similarity.structural import StructuralExplanation

__all__ = [
    "FLOWS_GID",
    "cell_centres",
    "cell_labels",
    "format_scores",
    "group_attention_grid_figure",
    "group_pair_figure",
    "part_mass_figure",
    "save_figure",
    "strongest_flows",
    "structural_pair_figure",
]

#: gid of the LineCollection holding the flow lines of :func:`structural_pair_figure`
FLOWS_GID = "structural-flows"

SHARE_CMAP = "viridis"  # a cell's share of SS
ATTENTION_CMAP = "magma"  # a group's attention
_EVEN_TIMES = 3.0  # the share scale reaches at least 3x the even share of a cell
_MAX_LINEWIDTH = 6.0
_MIN_LINEWIDTH = 0.5
_GAP = 0.16  # horizontal gap between the two photos, in units of the photo height
_OUTLINE = [patheffects.withStroke(linewidth=2.2, foreground="black")]


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


def strongest_flows(
    T: np.ndarray, S: np.ndarray, *, share: float = 0.5, limit: int = 64
) -> tuple[np.ndarray, np.ndarray, float]:
    """The cell pairs with the largest contributions ``T_ij S_ij``, largest first (ties: row-major):
    the fewest whose contributions sum to ``share`` of ``SS = sum_ij T_ij S_ij``, at most ``limit``
    (only positive contributions are drawn).

    Returns ``(rows, cols, carried)`` with ``carried = sum of their T_ij S_ij / SS`` (NaN when
    ``SS <= 0``, where no share can be stated).
    """
    if limit < 0:
        raise ValueError(f"top_flows must be >= 0, got {limit}")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"flow_share must be in [0, 1], got {share}")
    TS = np.asarray(T, dtype=np.float64) * np.asarray(S, dtype=np.float64)
    flat = TS.ravel()
    ss = float(flat.sum())
    order = np.argsort(-flat, kind="stable")
    order = order[flat[order] > 0][:limit]
    if ss > 0 and len(order):
        reached = np.flatnonzero(np.cumsum(flat[order]) >= share * ss * (1 - 1e-12))
        if len(reached):
            order = order[: reached[0] + 1]
    carried = float(flat[order].sum()) / ss if ss > 0 else math.nan
    rows, cols = np.divmod(order, TS.shape[1])
    return rows, cols, carried


def _percent(v: float) -> str:
    if abs(v) < 0.5:
        return "0%"
    return f"{v:.0f}%" if v >= 0 else f"({v:.0f}%)"


def _cell_texts(ax, centres: np.ndarray, cell_w: float, cell_h: float, texts: Sequence[str], fontsize: float) -> None:
    """Write each cell's text in its top-left corner (clear of the flow ends at the centres)."""
    for (cx, cy), text in zip(centres, texts, strict=True):
        ax.text(
            cx - 0.46 * cell_w,
            cy - 0.46 * cell_h,
            text,
            ha="left",
            va="top",
            fontsize=fontsize,
            color="white",
            fontweight="bold",
            path_effects=_OUTLINE,
            zorder=6,
        )


def _grid_lines(ax, box: tuple[float, float, float, float], g: int) -> None:
    left, top, right, bottom = box
    style: dict[str, Any] = {"color": "white", "lw": 0.6, "alpha": 0.6, "zorder": 3}
    for k in range(1, g):
        ax.plot([left + (right - left) * k / g] * 2, [top, bottom], **style)
        ax.plot([left, right], [top + (bottom - top) * k / g] * 2, **style)


def structural_pair_figure(
    image_x,
    image_y,
    explanation: StructuralExplanation,
    *,
    top_flows: int = 64,
    flow_share: float = 0.5,
    titles: tuple[str, str] = ("query", "candidate"),
    part_names: Sequence[str] | Mapping[Any, str] | None = None,
    notes: tuple[str, str] | None = None,
) -> Figure:
    """The figure that explains why ``image_x`` and ``image_y`` were judged alike.

    Args:
        image_x, image_y: the two photos, each a :class:`~glassmetric.explain.frames.FramedImage`
            (the original and the box the model's input covers; drawn at its own resolution) or
            the image as the model saw it (PIL image or ``HxWx3`` array; the grid covers all of it).
        explanation: :func:`glassmetric.similarity.structural.explain_pair` of the pair (x
            first), for ONE pair: ``S``/``T`` of shape ``(N, M)`` with ``N`` and ``M`` squares.
        top_flows: the most cell pairs drawn; flow_share: draw the fewest strongest pairs that
            carry this share of ``SS`` (see :func:`strongest_flows`); ``top_flows=0`` draws none.
        titles: names of the two images; notes: a short note after each title (e.g. its uncertainty).
        part_names: names written in the query's cells beside their share, a sequence of ``N``
            names or a mapping from a cell index / ``(row, col)`` to a name (see :func:`cell_labels`).

    Returns:
        A :class:`matplotlib.figure.Figure` on an Agg canvas (no pyplot state); save it with
        :func:`save_figure`. Axes: ``[pair, colour bar]``.
    """
    S, T = _array(explanation.S), _array(explanation.T)
    if S.ndim != 2 or T.shape != S.shape:
        raise ValueError(f"expected one pair's explanation with S and T of shape (N, M), got S {S.shape}, T {T.shape}")
    contrib_x = _array(explanation.region_contribution_x).reshape(-1)
    contrib_y = _array(explanation.region_contribution_y).reshape(-1)
    n, m = S.shape
    if _array(explanation.mu).size != n or _array(explanation.nu).size != m or contrib_x.size != n:
        raise ValueError("explanation fields disagree in their number of cells")
    gx, gy = _grid_of(n, "the query (rows of S)"), _grid_of(m, "the candidate (columns of S)")
    names = cell_labels(gx, part_names) if part_names is not None else None
    ss = _scalar(explanation.ss)
    rows, cols, carried = strongest_flows(T, S, share=flow_share, limit=int(top_flows))
    pics = [picture(image_x, "image_x"), picture(image_y, "image_y")]

    # shares of SS in percent (raw contributions when SS <= 0, where a share means nothing)
    by_share = ss > 0
    values = [c / ss * 100.0 if by_share else c for c in (contrib_x, contrib_y)]
    # the scale reaches at least _EVEN_TIMES the even share 100/N %, so a plan that spreads SS
    # evenly over the cells leaves the photos nearly clear
    even = 100.0 / min(n, m)
    top = max(float(values[0].max()), float(values[1].max()), _EVEN_TIMES * even if by_share else 1e-12)
    norm = Normalize(0.0, top)
    cmap = alpha_ramp(SHARE_CMAP)

    # ---- layout: both photos on one axes, each scaled to height 1 (aspect kept)
    scales = [1.0 / p.height for p in pics]
    widths = [p.width * s for p, s in zip(pics, scales, strict=True)]
    lefts = [0.0, widths[0] + _GAP]
    total_w = lefts[1] + widths[1]
    fig = Figure(figsize=(min(max(9.0, 1.6 + 5.4 * total_w), 18.0), 7.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    boxes, centres, heat = [], [], None
    for side, (pic, s, x0, g, vals) in enumerate(zip(pics, scales, lefts, (gx, gy), values, strict=True)):
        draw_picture(ax, pic, (x0, x0 + pic.width * s, 1.0, 0.0), s, x0)
        left, top_, right, bottom = pic.box
        box = (x0 + left * s, top_ * s, x0 + right * s, bottom * s)
        boxes.append(box)
        heat = shade(ax, vals.reshape(g, g), (box[0], box[2], box[3], box[1]), cmap, norm, gid=f"share-{'xy'[side]}")
        _grid_lines(ax, box, g)
        cw, ch = (box[2] - box[0]) / g, (box[3] - box[1]) / g
        centre = cell_centres(g, box[2] - box[0], box[3] - box[1]) + np.array([box[0], box[1]])
        centres.append(centre)
        if g <= 10:
            texts = [_percent(v) if by_share else f"{v:.2g}" for v in vals]
            if side == 0 and names is not None:
                texts = [f"{name} {t}" for name, t in zip(names, texts, strict=True)]
            _cell_texts(ax, centre, cw, ch, texts, fontsize=9 if g <= 5 else 7)
    for x0, w, pic, title, note in zip(lefts, widths, pics, titles, notes or ("", ""), strict=True):
        size = f"{pic.width}x{pic.height} px"
        ax.text(
            x0 + w / 2,
            -0.02,
            f"{title}  ({size})" + (f", {note}" if note else ""),
            ha="center",
            va="bottom",
            fontsize=12,
            fontweight="bold",
        )

    # flow lines (weakest first, so the strongest are drawn on top), width proportional to T_ij S_ij
    ts = (T * S)[rows, cols]
    order = np.arange(len(rows))[::-1]
    segments = _arcs(centres[0][rows[order]], centres[1][cols[order]])
    lw = np.maximum(_MAX_LINEWIDTH * ts[order] / ts.max(), _MIN_LINEWIDTH) if len(rows) else np.zeros(0)
    outline = LineCollection(
        segments,  # type: ignore[arg-type]  # an (F, points, 2) array works; matplotlib's stubs ask for a Sequence
        linewidths=lw + 1.6,
        colors="black",
        capstyle="round",
        zorder=4,
        alpha=0.7,
    )
    flows = LineCollection(
        segments,  # type: ignore[arg-type]
        linewidths=lw,
        colors="white",
        capstyle="round",
        zorder=4.1,
    )
    flows.set_gid(FLOWS_GID)
    ax.add_collection(outline)
    ax.add_collection(flows)
    if len(rows):
        ends = np.concatenate([centres[0][np.unique(rows)], centres[1][np.unique(cols)]])
        ax.scatter(ends[:, 0], ends[:, 1], s=14, c="white", edgecolors="black", linewidths=0.8, zorder=5)

    ax.set_xlim(-0.02, total_w + 0.02)
    ax.set_ylim(1.0 + 0.01, -0.09)
    ax.set_aspect("equal")
    ax.set_axis_off()
    if len(rows) == 0:
        flow_text = "no cell pairs drawn"
    elif math.isnan(carried):
        flow_text = f"the {len(rows)} strongest of {n * m} cell pairs by $T_{{ij}} S_{{ij}}$ (SS <= 0: no share)"
    else:
        flow_text = f"the {len(rows)} strongest of {n * m} cell pairs carry {100 * carried:.0f}% of SS"
    ax.set_title(f"lines: {flow_text} (width $\\propto T_{{ij}} S_{{ij}}$)", fontsize=10.5, color="0.2", pad=4)
    assert heat is not None  # drawn for both photos
    cb = fig.colorbar(heat, ax=ax, location="right", shrink=0.8, pad=0.01, fraction=0.03)
    if by_share:
        cb.set_label(f"cell's share of SS (%); even spread {even:.3g}% dashed", fontsize=9.5)
        cb.ax.axhline(even, color="0.2", lw=1.2, ls="--")
    else:
        cb.set_label("cell's contribution to SS", fontsize=9.5)
    cb.ax.tick_params(labelsize=8)
    fig.suptitle(format_scores(explanation), fontsize=15, fontweight="bold")
    add_caption(
        fig,
        "brighter cells carry more of SS (share written in each); lines join the cells the plan matches, "
        "thicker = more of SS" + ("; dashed: what the model sees" if any(p.cropped for p in pics) else ""),
    )
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


def _attention_panel(ax, pic: Picture, amap: np.ndarray, norm: Normalize, marker_size: float = 12):
    """``pic`` at its own resolution with one attention map smoothly upsampled over the model's box
    (transparent where the attention is low) and its peak marked; returns the shaded image."""
    w, h = pic.width, pic.height
    draw_picture(ax, pic, (0, w, h, 0), 1.0)
    left, top, right, bottom = pic.box
    heat = shade(ax, amap, (left, right, bottom, top), alpha_ramp(ATTENTION_CMAP), norm, smooth=True)
    r, c = np.unravel_index(int(np.argmax(amap)), amap.shape)
    ax.plot(
        left + (c + 0.5) * (right - left) / amap.shape[1],
        top + (r + 0.5) * (bottom - top) / amap.shape[0],
        marker="+",
        color="white",
        markersize=marker_size,
        mew=2.5,
        path_effects=_OUTLINE,
        zorder=5,
    )
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    return heat


def _plain_panel(ax, pic: Picture) -> None:
    draw_picture(ax, pic, (0, pic.width, pic.height, 0), 1.0)
    ax.set_xlim(0, pic.width)
    ax.set_ylim(pic.height, 0)
    ax.set_xticks([])
    ax.set_yticks([])


_ATTENTION_CAPTION = "brighter = more of the group's attention (which sums to 1 over the image); + marks its peak"


def group_attention_grid_figure(images, attention, *, titles=None, group_parts=None) -> Figure:
    """Where each attention group looks, on several images: one row per image, the photo then
    one panel per group (its map over the photo, transparent where low, peak marked), every map
    on one colour scale.

    Args:
        images: a sequence of images the maps were computed on: :class:`~glassmetric.explain.frames.FramedImage`
            originals (drawn at their own resolution) or the model's views (PIL images or arrays).
        attention: ``(n, k, h, w)`` attention maps (each sums to 1 over positions).
        titles: optional per-image labels (left column); group_parts: optional per-group
            column headings, e.g. the part each group most often peaks on.

    Axes: ``fig.axes`` is ``[image 1, group 1 .. k, image 2, ...]`` plus the colour bar.
    """
    att = _array(attention)
    if att.ndim != 4 or att.shape[0] != len(images):
        raise ValueError(f"attention must be (n={len(images)}, k, h, w), got shape {att.shape}")
    n, k = att.shape[:2]
    pics = [picture(images[row], f"image {row}") for row in range(n)]
    aspect = max(p.width / p.height for p in pics)
    fig = Figure(figsize=(1.9 * aspect * (k + 1) + 1.0, 1.9 * n + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    norm = Normalize(0.0, float(att.max()) or 1.0)
    heat = None
    for row, pic in enumerate(pics):
        ax = fig.add_subplot(n, k + 1, row * (k + 1) + 1)
        _plain_panel(ax, pic)
        if titles is not None:
            ax.set_ylabel(str(titles[row]), fontsize=8)
        for i in range(k):
            ax = fig.add_subplot(n, k + 1, row * (k + 1) + i + 2)
            heat = _attention_panel(ax, pic, att[row, i], norm, marker_size=8)
            if row == 0:
                head = f"group {i + 1}" + (f"\n({group_parts[i]})" if group_parts is not None else "")
                ax.set_title(head, fontsize=9)
    assert heat is not None  # at least one image and one group
    cb = fig.colorbar(heat, ax=fig.axes, location="right", shrink=min(0.5, 4.0 / n), label="attention per cell")
    cb.ax.tick_params(labelsize=8)
    add_caption(fig, _ATTENTION_CAPTION)
    return fig


def group_pair_figure(image_x, image_y, explanation, *, titles: tuple[str, str] = ("query", "candidate")) -> Figure:
    """The figure that explains a grouping (DGML) match: where each group looked, and what it scored.

    Rows: the two photos (:class:`~glassmetric.explain.frames.FramedImage` originals at their
    own resolution, or the model's views). Columns: the photo, then one panel per group with
    that group's attention map smoothly upsampled over the model's box (transparent where low,
    its peak marked). Each group's column is headed by its cosine between the two images and
    what it adds to the score, ``cos_i / k``; the title is the sum, the cosine of the
    concatenated embeddings used for ranking.

    Args:
        explanation: a :class:`glassmetric.explain.groups.GroupExplanation` of one pair.

    Axes: ``fig.axes`` is ``[row x: image, group 1 .. k, row y: image, group 1 .. k, colour bar]``.
    """
    k = explanation.groups
    att = [_array(explanation.attention_x), _array(explanation.attention_y)]
    if att[0].ndim != 3 or att[0].shape[0] != k or att[1].shape[0] != k:
        raise ValueError(f"expected (k={k}, h, w) attention maps, got {att[0].shape} and {att[1].shape}")
    sim = _array(explanation.group_similarity).reshape(-1)
    contrib = _array(explanation.contribution).reshape(-1)
    score = _scalar(explanation.score)
    pics = [picture(image_x, "image_x"), picture(image_y, "image_y")]
    aspect = max(p.width / p.height for p in pics)

    fig = Figure(figsize=(2.5 * aspect * (k + 1) + 1.0, 6.4), layout="constrained")
    FigureCanvasAgg(fig)
    norm = Normalize(0.0, max(float(a.max()) for a in att) or 1.0)
    heat = None
    for row, (pic, maps, title) in enumerate(zip(pics, att, titles, strict=False)):
        ax = fig.add_subplot(2, k + 1, row * (k + 1) + 1)
        _plain_panel(ax, pic)
        ax.set_axis_off()
        ax.set_title(f"{title}\n({pic.width}x{pic.height} px)", fontsize=10, fontweight="bold")
        for i in range(k):
            ax = fig.add_subplot(2, k + 1, row * (k + 1) + i + 2)
            heat = _attention_panel(ax, pic, maps[i], norm)
            if row == 0:
                ax.set_title(
                    f"group {i + 1}: cos {_signed(float(sim[i]))}\nadds {_signed(float(contrib[i]))}", fontsize=10
                )
    assert heat is not None
    cb = fig.colorbar(heat, ax=fig.axes, location="right", shrink=0.7, label="attention per cell $a_{ip}$")
    cb.ax.tick_params(labelsize=8)
    parts = " + ".join(_signed(float(s)) for s in sim)
    fig.suptitle(f"score {_signed(score)} = ({parts}) / {k}", fontsize=14, fontweight="bold")
    add_caption(fig, _ATTENTION_CAPTION + "; a group adds its cos / k to the score")
    return fig


# ---------------------------------------------------------------------------- parts


def part_mass_figure(masses: Mapping[str, Mapping[str, float]], n_cells: int, *, title: str | None = None) -> Figure:
    """Which parts carry the structural similarity: for each model (``masses``: name -> {part:
    mean share of SS from the cell holding the part}, e.g. ``part_mass`` of
    :func:`glassmetric.explain.correspondence.evaluate_correspondence`), one bar per part, parts
    sorted by the first model's share, the even spread ``1 / n_cells`` dashed."""
    if not masses:
        raise ValueError("part_mass_figure needs the part shares of at least one model")
    first = next(iter(masses.values()))
    parts = sorted(first, key=lambda p: -first[p])
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(masses)
    colours = ("#3b528b", "#5ec962", "#21918c", "#fde725")  # viridis steps
    for i, (name, mass) in enumerate(masses.items()):
        pos = np.arange(len(parts)) + i * width
        ax.bar(pos, [mass[p] for p in parts], width, label=name, zorder=2, color=colours[i % len(colours)])
    ax.axhline(1.0 / n_cells, color="0.3", ls="--", lw=1, label=f"even spread 1/{n_cells}")
    ax.set_xticks(np.arange(len(parts)) + width * (len(masses) - 1) / 2, parts, rotation=35, ha="right")
    ax.set_ylabel("share of SS from the\ncell holding the part")
    ax.grid(axis="y", color="0.88", zorder=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(title or "Which parts carry the structural similarity (same-class test pairs)", fontsize=11)
    add_caption(
        fig,
        "a bar: the mean share of SS from the cell holding the part; above the dashed line, more than an even share",
    )
    return fig
