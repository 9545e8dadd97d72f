"""The structural-match figure: layout, scores, flow lines, non-square images, PNG output."""

import threading
from pathlib import Path

import matplotlib.text
import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from PIL import Image

import glassmetric.explain.figures as figures
from glassmetric.explain.figures import (
    FLOWS_GID,
    cell_centres,
    cell_labels,
    format_scores,
    save_figure,
    structural_pair_figure,
)
from glassmetric.similarity.structural import StructuralExplanation, explain_pair


def _explanation(grid: int, seed: int = 0, dim: int = 16) -> StructuralExplanation:
    g = torch.Generator().manual_seed(seed)
    n = grid * grid
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    y = torch.nn.functional.normalize(x.flip(0) + 0.8 * torch.randn(n, dim, generator=g), dim=-1)
    gx = torch.nn.functional.normalize(x.mean(0), dim=-1)
    gy = torch.nn.functional.normalize(y.mean(0), dim=-1)
    return explain_pair(x, y, gx, gy)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _flows(fig: Figure) -> LineCollection:
    found = [c for c in fig.axes[0].collections if c.get_gid() == FLOWS_GID]
    assert len(found) == 1
    return found[0]


def _texts(fig: Figure) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))


def _flow_cells(fig, grid, wx, wy):
    """(i, j) of every drawn flow, recovered from the end points of its path."""
    cx = cell_centres(grid, wx, 1.0)
    cy = cell_centres(grid, wy, 1.0) + np.array([wx + figures._GAP, 0.0])
    cells = []
    for seg in _flows(fig).get_segments():
        i = int(np.argmin(np.linalg.norm(cx - seg[0], axis=1)))
        j = int(np.argmin(np.linalg.norm(cy - seg[-1], axis=1)))
        np.testing.assert_allclose(seg[0], cx[i], atol=1e-9)
        np.testing.assert_allclose(seg[-1], cy[j], atol=1e-9)
        cells.append((i, j))
    return cells


def test_cell_centres_row_major_and_stretched():
    np.testing.assert_allclose(cell_centres(2, 100, 60), [[25, 15], [75, 15], [25, 45], [75, 45]])
    c = cell_centres(7, 1.0, 1.0)
    assert c.shape == (49, 2)
    np.testing.assert_allclose(c[8], [1.5 / 7, 1.5 / 7])  # row 1, col 1
    with pytest.raises(ValueError):
        cell_centres(0, 10, 10)


@pytest.mark.parametrize("grid", [4, 7])
def test_figure_layout_scores_and_flows(grid):
    e = _explanation(grid)
    fig = structural_pair_figure(_image(40, 40), Image.fromarray(_image(40, 40, 1)), e, top_flows=12)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 4  # pair, contributions, two colour bars
    text = _texts(fig)
    for value in (e.s_global, e.ss, e.score):
        assert f"{float(value):.2f}" in text
    assert format_scores(e) in text
    assert "cell similarity $S_{ij}$" in text  # colour bar of the flows

    cells = _flow_cells(fig, grid, 1.0, 1.0)
    T = e.T.numpy()
    assert len(cells) == 12
    expected = np.argsort(-T.ravel(), kind="stable")[:12]
    assert sorted(i * T.shape[1] + j for i, j in cells) == sorted(expected.tolist())
    # widths follow T (proportional above the visibility floor), strongest drawn last
    widths = np.asarray(_flows(fig).get_linewidths(), dtype=float)
    t = np.array([T[i, j] for i, j in cells])
    assert np.all(np.diff(t) >= 0) and np.all(np.diff(widths) >= 0)
    above = widths > figures._MIN_LINEWIDTH
    np.testing.assert_allclose(widths[above] / t[above], widths[-1] / t[-1], rtol=1e-9)
    # colours are S_ij of the drawn flows
    np.testing.assert_allclose(_flows(fig).get_array(), [e.S[i, j].item() for i, j in cells])
    # the bar chart has one bar per cell of x, sorted, summing to SS
    heights = np.array([p.get_height() for p in fig.axes[1].patches])
    assert heights.shape == (grid * grid,) and np.all(np.diff(heights) <= 0)
    assert heights.sum() == pytest.approx(float(e.ss), abs=1e-6)


def test_flow_count_is_capped_by_nonzero_entries():
    n, grid = 16, 4
    e = _explanation(grid)
    T = torch.zeros(n, n)
    T[torch.arange(n), torch.arange(n).flip(0)] = torch.linspace(1, 2, n) / torch.linspace(1, 2, n).sum()
    sparse = StructuralExplanation(**{**e.__dict__, "T": T})
    assert (
        len(_flows(structural_pair_figure(_image(32, 32), _image(32, 32), sparse, top_flows=100)).get_segments()) == n
    )
    assert len(_flows(structural_pair_figure(_image(32, 32), _image(32, 32), sparse, top_flows=5)).get_segments()) == 5
    assert len(_flows(structural_pair_figure(_image(32, 32), _image(32, 32), e, top_flows=0)).get_segments()) == 0
    with pytest.raises(ValueError):
        structural_pair_figure(_image(32, 32), _image(32, 32), e, top_flows=-1)


def test_non_square_images_stretch_the_grid(tmp_path):
    grid = 4
    e = _explanation(grid, seed=3)
    hx, wx, hy, wy = 60, 100, 90, 50
    fig = structural_pair_figure(_image(hx, wx), _image(hy, wy), e, top_flows=8)
    cells = _flow_cells(fig, grid, wx / hx, wy / hy)  # asserts end points on stretched centres
    assert len(cells) == 8
    # both images and both heat maps span their whole image
    extents = [im.get_extent() for im in fig.axes[0].images]
    assert extents[0] == pytest.approx([0, wx / hx, 1, 0])
    assert extents[1] == pytest.approx([wx / hx + figures._GAP, wx / hx + figures._GAP + wy / hy, 1, 0])
    assert extents[2:] == [extents[0], extents[1]]
    out = save_figure(fig, tmp_path / "a" / "b" / "pair.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_part_names_label_the_bars():
    grid = 4
    e = _explanation(grid)
    names = [f"part{i}" for i in range(grid * grid)]
    fig = structural_pair_figure(_image(32, 32), _image(32, 32), e, part_names=names)
    ticks = [t.get_text() for t in fig.axes[1].get_xticklabels()]
    order = np.argsort(-e.region_contribution_x.numpy(), kind="stable")
    assert ticks == [names[i] for i in order]
    assert cell_labels(2, {(1, 0): "wing", 1: "head"}) == ["(0, 0)", "head", "wing", "(1, 1)"]
    with pytest.raises(ValueError):
        cell_labels(2, ["a", "b"])


def test_save_figure_writes_png_and_creates_dirs(tmp_path):
    e = _explanation(4)
    fig = structural_pair_figure(_image(32, 32), _image(32, 32), e, titles=("q", "c"))
    path = save_figure(fig, tmp_path / "new" / "dir" / "fig.png")
    assert isinstance(path, Path) and path.stat().st_size > 10_000
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 800


def test_figures_from_two_threads_and_no_pyplot(tmp_path):
    e = _explanation(4)
    errors = []

    def work(k):
        try:
            save_figure(structural_pair_figure(_image(32, 32, k), _image(32, 32), e), tmp_path / f"{k}.png")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all((tmp_path / f"{k}.png").stat().st_size > 0 for k in range(2))
    src = Path(figures.__file__).read_text()
    assert "import matplotlib.pyplot" not in src and "from matplotlib import pyplot" not in src


def test_rejects_batched_explanations():
    x = torch.nn.functional.normalize(torch.randn(2, 16, 8), dim=-1)
    g = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    with pytest.raises(ValueError, match="one pair"):
        structural_pair_figure(_image(32, 32), _image(32, 32), explain_pair(x, x, g, g))
