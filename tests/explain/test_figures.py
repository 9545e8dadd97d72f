"""The explanation figures read at a glance: photos at their own resolution with the model's grid
mapped onto the eval crop, overlays transparent where the value is 0, no jet, flows chosen and
sized by T_ij S_ij with the share of SS they carry stated, one colour bar per quantity, a caption."""

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
from glassmetric.data.transforms import eval_geometry
from glassmetric.explain.figures import (
    FLOWS_GID,
    cell_centres,
    cell_labels,
    format_scores,
    group_attention_grid_figure,
    group_pair_figure,
    part_mass_figure,
    save_figure,
    structural_pair_figure,
)
from glassmetric.explain.frames import FramedImage, crop_box
from glassmetric.explain.groups import GroupExplanation
from glassmetric.explain.overlays import CAPTION_GID
from glassmetric.explain.pair import PairExplanation
from glassmetric.explain.panels import pair_figures
from glassmetric.explain.uncertainty import uncertainty_grid_figure
from glassmetric.similarity.structural import StructuralExplanation, explain_pair

PERCEPTUAL = {"viridis", "cividis", "magma", "inferno", "plasma"}


def _explanation(grid: int, seed: int = 0, dim: int = 16) -> StructuralExplanation:
    g = torch.Generator().manual_seed(seed)
    n = grid * grid
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    y = torch.nn.functional.normalize(x.flip(0) + 0.8 * torch.randn(n, dim, generator=g), dim=-1)
    gx = torch.nn.functional.normalize(x.mean(0), dim=-1)
    gy = torch.nn.functional.normalize(y.mean(0), dim=-1)
    return explain_pair(x, y, gx, gy)


def _from_plan(S: np.ndarray, T: np.ndarray) -> StructuralExplanation:
    """A consistent single-pair explanation for a given S and T (numpy reference of the fields)."""
    ts = S * T
    ss = ts.sum()
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
    return StructuralExplanation(
        S=t(S),
        T=t(T),
        mu=t(T.sum(1)),
        nu=t(T.sum(0)),
        contribution=t(ts / ss),
        region_contribution_x=t(ts.sum(1)),
        region_contribution_y=t(ts.sum(0)),
        ss=t(ss),
        s_global=t(0.5),
        score=t(0.5 + ss),
    )


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _flows(fig: Figure) -> LineCollection:
    found = [c for c in fig.axes[0].collections if c.get_gid() == FLOWS_GID]
    assert len(found) == 1
    return found[0]


def _texts(fig: Figure) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))


def _by_gid(fig: Figure, gid: str):
    found = [im for ax in fig.axes for im in ax.images if im.get_gid() == gid]
    assert len(found) == 1
    return found[0]


def _flow_cells(fig, cx, cy):
    """(i, j) of every drawn flow, recovered from the end points of its path."""
    cells = []
    for seg in _flows(fig).get_segments():
        i = int(np.argmin(np.linalg.norm(cx - seg[0], axis=1)))
        j = int(np.argmin(np.linalg.norm(cy - seg[-1], axis=1)))
        np.testing.assert_allclose(seg[0], cx[i], atol=1e-9)
        np.testing.assert_allclose(seg[-1], cy[j], atol=1e-9)
        cells.append((i, j))
    return cells


def _square_centres(grid, wx=1.0, wy=1.0):
    return cell_centres(grid, wx, 1.0), cell_centres(grid, wy, 1.0) + np.array([wx + figures._GAP, 0.0])


def _caption(fig: Figure) -> str:
    found = [t for t in fig.findobj(matplotlib.text.Text) if t.get_gid() == CAPTION_GID]
    assert len(found) == 1
    return found[0].get_text()


def _colour_bars(fig: Figure) -> list:
    return [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]


def test_cell_centres_row_major_and_stretched():
    np.testing.assert_allclose(cell_centres(2, 100, 60), [[25, 15], [75, 15], [25, 45], [75, 45]])
    c = cell_centres(7, 1.0, 1.0)
    assert c.shape == (49, 2)
    np.testing.assert_allclose(c[8], [1.5 / 7, 1.5 / 7])  # row 1, col 1
    with pytest.raises(ValueError):
        cell_centres(0, 10, 10)


@pytest.mark.parametrize(("size", "crop", "resize"), [((300, 200), 64, 73), ((150, 240), 56, 64), ((90, 90), 64, 64)])
def test_crop_box_is_what_the_eval_transform_keeps(size, crop, resize):
    """Each pixel of the model's view comes from the box: checked on a photo whose values are its x and y."""
    w, h = size
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32) + 0.5, np.arange(h, dtype=np.float32) + 0.5)
    view_x = np.asarray(eval_geometry(crop, resize)(Image.fromarray(xs, mode="F")))
    view_y = np.asarray(eval_geometry(crop, resize)(Image.fromarray(ys, mode="F")))
    left, top, right, bottom = crop_box(size, crop, resize)
    centres = np.arange(crop) + 0.5
    inner = slice(2, -2)  # resampling blurs the photo's border
    np.testing.assert_allclose(view_x[0, inner], (left + centres * (right - left) / crop)[inner], atol=0.6)
    np.testing.assert_allclose(view_y[inner, 0], (top + centres * (bottom - top) / crop)[inner], atol=0.6)


def test_pair_figure_draws_the_photos_at_their_own_resolution_with_the_grid_on_the_crop():
    grid, e = 4, _explanation(4)
    a, b = Image.fromarray(_image(200, 300)), Image.fromarray(_image(240, 150, 1))
    boxes = (crop_box(a.size, 64, 73), crop_box(b.size, 64, 73))
    fig = structural_pair_figure(FramedImage(a, boxes[0]), FramedImage(b, boxes[1]), e)
    photos = fig.axes[0].images[0], next(im for im in fig.axes[0].images[1:] if im.get_array().ndim == 3)
    assert photos[0].get_array().shape == (200, 300, 3) and photos[1].get_array().shape == (240, 150, 3)
    assert photos[0].get_extent() == pytest.approx([0, 1.5, 1, 0])  # height 1, aspect kept
    x0 = 1.5 + figures._GAP
    assert photos[1].get_extent() == pytest.approx([x0, x0 + 150 / 240, 1, 0])
    for gid, (left, top, right, bottom), (scale, off) in (
        ("share-x", boxes[0], (1 / 200, 0.0)),
        ("share-y", boxes[1], (1 / 240, x0)),
    ):
        extent = _by_gid(fig, gid).get_extent()
        assert extent == pytest.approx([off + left * scale, off + right * scale, bottom * scale, top * scale])
    # the flows start and end on the centres of the cells of those boxes
    cx = cell_centres(grid, (boxes[0][2] - boxes[0][0]) / 200, (boxes[0][3] - boxes[0][1]) / 200)
    cx += np.array([boxes[0][0], boxes[0][1]]) / 200
    cy = cell_centres(grid, (boxes[1][2] - boxes[1][0]) / 240, (boxes[1][3] - boxes[1][1]) / 240)
    cy += np.array([x0 + boxes[1][0] / 240, boxes[1][1] / 240])
    assert len(_flow_cells(fig, cx, cy)) > 0
    assert "300x200 px" in _texts(fig) and "150x240 px" in _texts(fig)


def test_share_overlay_is_transparent_at_zero_and_grows_with_the_value():
    grid = 3
    rng = np.random.default_rng(1)
    S = rng.uniform(0.1, 0.9, (9, 9))
    T = rng.uniform(0.0, 1.0, (9, 9))
    T[4] = 0.0  # cell 4 of x carries nothing
    T[:, 7] = 0.0  # cell 7 of y carries nothing
    T /= T.sum()
    e = _from_plan(S, T)
    fig = structural_pair_figure(_image(30, 30), _image(30, 30), e)
    for gid, contrib in (("share-x", (S * T).sum(1)), ("share-y", (S * T).sum(0))):
        im = _by_gid(fig, gid)
        np.testing.assert_allclose(np.asarray(im.get_array()).ravel(), 100 * contrib / (S * T).sum(), rtol=1e-9)
        alpha = im.to_rgba(im.get_array())[..., 3].ravel()
        zero = contrib == 0
        assert zero.any() and np.all(alpha[zero] == 0)
        order = np.argsort(contrib)
        assert np.all(np.diff(alpha[order]) >= 0) and alpha.max() > alpha[~zero].min() > 0
    # the shares are written in the cells
    for i in range(grid * grid):
        share = 100 * (S * T).sum(1)[i] / (S * T).sum()
        assert (f"{share:.0f}%" if share >= 0.5 else "0%") in _texts(fig)


def test_colour_maps_are_perceptually_uniform_and_never_jet():
    e = _explanation(4)
    att = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    att /= att.sum((-1, -2), keepdim=True)
    g = GroupExplanation(torch.tensor([0.5, 0.2, 0.1]), torch.tensor([0.5, 0.2, 0.1]) / 3, torch.tensor(0.27), *att)
    figs = [
        structural_pair_figure(_image(32, 32), _image(32, 32), e),
        group_pair_figure(_image(32, 32), _image(32, 32), g),
        group_attention_grid_figure([_image(32, 32)] * 2, att),
    ]
    for fig in figs:
        shaded = [im for ax in fig.axes for im in ax.images if im.get_array().ndim == 2]
        assert shaded
        for im in shaded:
            name = im.get_cmap().name
            assert "jet" not in name and name.split("+")[0] in PERCEPTUAL
            assert im.get_cmap()(0.0)[3] == 0.0  # the bottom of the scale leaves the photo untouched


def test_drawn_flows_are_the_strongest_by_T_times_S_and_the_stated_share_is_what_they_carry():
    grid = 4
    e = _explanation(grid, seed=2)
    S, T = e.S.numpy().astype(np.float64), e.T.numpy().astype(np.float64)
    ts = (S * T).ravel()
    ss = ts.sum()
    ranked = sorted(range(ts.size), key=lambda k: (-ts[k], k))  # brute force, ties row-major
    need = next(n for n in range(1, ts.size + 1) if sum(ts[k] for k in ranked[:n]) >= 0.5 * ss)
    cx, cy = _square_centres(grid)
    for limit, expected in ((64, need), (3, min(3, need))):
        fig = structural_pair_figure(_image(32, 32), _image(32, 32), e, top_flows=limit)
        cells = _flow_cells(fig, cx, cy)
        assert sorted(i * 16 + j for i, j in cells) == sorted(ranked[:expected])
        share = sum(ts[k] for k in ranked[:expected]) / ss
        assert f"the {expected} strongest of 256 cell pairs carry {100 * share:.0f}% of SS" in fig.axes[0].get_title()
        # widths follow T_ij S_ij (proportional above the visibility floor), strongest drawn last
        widths = np.asarray(_flows(fig).get_linewidths(), dtype=float)
        drawn = np.array([S[i, j] * T[i, j] for i, j in cells])
        assert np.all(np.diff(drawn) >= 0) and np.all(np.diff(widths) >= 0)
        above = widths > figures._MIN_LINEWIDTH
        np.testing.assert_allclose(widths[above] / drawn[above], widths[-1] / drawn[-1], rtol=1e-9)
    assert need > 3  # the cap binds in the second case


def test_flow_count_is_capped_by_positive_entries():
    n, grid = 16, 4
    e = _explanation(grid)
    T = torch.zeros(n, n, dtype=torch.float64)
    T[torch.arange(n), torch.arange(n).flip(0)] = 1.0 / n
    sparse = _from_plan(np.ones((n, n)), T.numpy())
    fig = structural_pair_figure(_image(32, 32), _image(32, 32), sparse, flow_share=1.0)
    assert len(_flows(fig).get_segments()) == n and "carry 100% of SS" in fig.axes[0].get_title()
    assert len(_flows(structural_pair_figure(_image(32, 32), _image(32, 32), e, top_flows=0)).get_segments()) == 0
    with pytest.raises(ValueError):
        structural_pair_figure(_image(32, 32), _image(32, 32), e, top_flows=-1)


def test_one_colour_bar_per_quantity_and_a_caption_under_every_figure():
    e = _explanation(4)
    att = torch.rand(2, 2, 3, 3, dtype=torch.float64)
    att /= att.sum((-1, -2), keepdim=True)
    g = GroupExplanation(torch.tensor([0.4, 0.6]), torch.tensor([0.2, 0.3]), torch.tensor(0.5), *att)
    pair = structural_pair_figure(_image(32, 32), _image(32, 32), e)
    assert len(pair.axes) == 2 and len(_colour_bars(pair)) == 1  # the photos, one bar: the cells' share of SS
    bar = _colour_bars(pair)[0]._colorbar
    assert _by_gid(pair, "share-x").norm is bar.mappable.norm is _by_gid(pair, "share-y").norm
    assert "share of SS" in bar.ax.get_ylabel()
    grouped = group_pair_figure(_image(32, 32), _image(32, 32), g)
    assert len(grouped.axes) == 2 * (1 + 2) + 1 and len(_colour_bars(grouped)) == 1  # one bar: attention
    grid = group_attention_grid_figure([_image(32, 32)] * 2, att)
    assert len(_colour_bars(grid)) == 1
    doubt = uncertainty_grid_figure([_image(20, 30)], [2.0], [False], [_image(20, 30)], [1.0], [True], columns=2)
    assert len(_colour_bars(doubt)) == 0
    parts = part_mass_figure({"a": {"tail": 0.05, "beak": 0.2}, "b": {"tail": 0.1, "beak": 0.1}}, 16)
    assert len(_colour_bars(parts)) == 0
    assert [t.get_text() for t in parts.axes[0].get_xticklabels()] == ["beak", "tail"]  # by the first model's share
    for fig in (pair, grouped, grid, doubt, parts):
        text = _caption(fig)
        assert text.startswith("How to read this: ") and "\n" not in text


def test_group_panels_show_the_photo_at_its_size_with_the_map_on_the_crop():
    att = torch.rand(2, 2, 3, 3, dtype=torch.float64)
    att /= att.sum((-1, -2), keepdim=True)
    g = GroupExplanation(torch.tensor([0.4, 0.6]), torch.tensor([0.2, 0.3]), torch.tensor(0.5), *att)
    a = Image.fromarray(_image(120, 200))
    box = crop_box(a.size, 64, 73)
    fig = group_pair_figure(FramedImage(a, box), _image(64, 64), g)
    panel = fig.axes[1]  # group 1 on the query
    photo, heat = panel.images
    assert photo.get_array().shape == (120, 200, 3) and photo.get_extent() == pytest.approx([0, 200, 120, 0])
    assert heat.get_extent() == pytest.approx([box[0], box[2], box[3], box[1]])
    assert "adds 0.20" in _texts(fig) and "adds 0.30" in _texts(fig)


def test_pair_figures_draw_the_originals_when_the_pair_carries_them():
    e = _explanation(4)
    a, b = Image.fromarray(_image(100, 160)), Image.fromarray(_image(90, 90, 1))
    views = (Image.fromarray(_image(64, 64)), Image.fromarray(_image(64, 64, 1)))
    originals = (FramedImage(a, crop_box(a.size, 64, 73)), FramedImage(b, crop_box(b.size, 64, 73)))
    fig = pair_figures(PairExplanation(images=views, structural=e, originals=originals))["flows"]
    assert fig.axes[0].images[0].get_array().shape == (100, 160, 3)
    fig = pair_figures(PairExplanation(images=views, structural=e))["flows"]
    assert fig.axes[0].images[0].get_array().shape == (64, 64, 3)


def test_scores_and_part_names_are_written():
    grid = 4
    e = _explanation(grid)
    names = [f"part{i}" for i in range(grid * grid)]
    fig = structural_pair_figure(_image(32, 32), _image(32, 32), e, part_names=names)
    text = _texts(fig)
    for value in (e.s_global, e.ss, e.score):
        assert f"{float(value):.2f}" in text
    assert format_scores(e) in text and fig._suptitle.get_text() == format_scores(e)
    assert all(f"part{i} " in text for i in range(grid * grid))
    assert cell_labels(2, {(1, 0): "wing", 1: "head"}) == ["(0, 0)", "head", "wing", "(1, 1)"]
    with pytest.raises(ValueError):
        cell_labels(2, ["a", "b"])


def test_uncertainty_tiles_show_each_photo_at_its_size():
    fig = uncertainty_grid_figure([_image(20, 30)], [2.0], [False], [_image(40, 25)], [1.0], [True], columns=2)
    shown = [ax.images[0].get_array().shape for ax in fig.axes if ax.images]
    assert shown == [(20, 30, 3), (40, 25, 3)]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["\u2717 u = 2", "\u2713 u = 1"]


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
    for module in ("figures.py", "overlays.py", "uncertainty.py"):
        src = (Path(figures.__file__).parent / module).read_text()
        assert "import matplotlib.pyplot" not in src and "from matplotlib import pyplot" not in src


def test_rejects_batched_explanations():
    x = torch.nn.functional.normalize(torch.randn(2, 16, 8), dim=-1)
    g = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    with pytest.raises(ValueError, match="one pair"):
        structural_pair_figure(_image(32, 32), _image(32, 32), explain_pair(x, x, g, g))
