"""Spatial grid head: brute-force per-location projection, resampling, sharing the global head."""

import pytest
import torch

from glassmetric.models import build_model
from glassmetric.models.global_head import GlobalHead
from glassmetric.models.output import EmbeddingOutput
from glassmetric.models.spatial_head import SpatialGridHead


def test_shared_head_applies_the_global_linear_at_every_location():
    torch.manual_seed(0)
    head = GlobalHead(8, 5)
    fmap = torch.randn(2, 8, 7, 7)
    spatial = SpatialGridHead.sharing(head, grid=7)
    projected = spatial.project(fmap)
    for b in range(2):
        for i in range(7):
            for j in range(7):
                expected = head.linear.weight @ fmap[b, :, i, j] + head.linear.bias
                torch.testing.assert_close(projected[b, :, i, j], expected)
    assert list(spatial.parameters()) == []


def _bilinear(fmap, size):
    """Bilinear resampling written out (half-pixel centres, as align_corners=False): output pixel
    k of n samples the input at (k + 0.5) * h / n - 0.5, clamped to the edge pixels."""
    d, h, w = len(fmap), len(fmap[0]), len(fmap[0][0])

    def taps(k, src):
        pos = min(max((k + 0.5) * src / size - 0.5, 0.0), src - 1)
        lo = int(pos)
        hi = min(lo + 1, src - 1)
        return lo, hi, pos - lo

    out = [[[0.0] * size for _ in range(size)] for _ in range(d)]
    for y in range(size):
        y0, y1, fy = taps(y, h)
        for x in range(size):
            x0, x1, fx = taps(x, w)
            for c in range(d):
                top = fmap[c][y0][x0] * (1 - fx) + fmap[c][y0][x1] * fx
                bottom = fmap[c][y1][x0] * (1 - fx) + fmap[c][y1][x1] * fx
                out[c][y][x] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize("h, w, grid", [(7, 7, 4), (3, 5, 2), (8, 8, 4)])
def test_feature_map_to_grid_matches_a_hand_computation(h, w, grid):
    """Bilinear up to 4g x 4g, 4 x 4 block means, row-major cells, each L2-normalised."""
    from glassmetric.models import feature_map_to_grid

    g = torch.Generator().manual_seed(h * w + grid)
    fmap = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    got = feature_map_to_grid(fmap, grid)
    assert got.shape == (2, grid * grid, 3)
    for b in range(2):
        up = _bilinear(fmap[b].tolist(), 4 * grid)
        for i in range(grid):
            for j in range(grid):
                cell = [sum(up[c][4 * i + di][4 * j + dj] for di in range(4) for dj in range(4)) / 16 for c in range(3)]
                norm = sum(v * v for v in cell) ** 0.5
                expected = torch.tensor([v / norm for v in cell], dtype=torch.float64)
                torch.testing.assert_close(got[b, i * grid + j], expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="grid"):
        feature_map_to_grid(fmap, 0)
    with pytest.raises(ValueError, match="feature_map"):
        feature_map_to_grid(fmap[0], 4)


def test_output_is_normalised_row_major_cells_and_trainable_head_learns():
    model = build_model("resnet18", 16)
    model.add_head("spatial", SpatialGridHead(model.backbone.out_channels, 16, grid=4))
    out: EmbeddingOutput = model(torch.randn(2, 3, 64, 64))
    assert out.local.shape == (2, 16, 16)
    torch.testing.assert_close(out.local.norm(dim=-1), torch.ones(2, 16))
    out.local.sum().backward()
    assert model.extra_heads["spatial"].conv.weight.grad is not None
    assert "spatial" in model.parameter_groups()


def test_sharing_head_adds_no_state_and_follows_the_global_weights():
    model = build_model("resnet18", 16)
    keys = set(model.state_dict())
    model.add_head("spatial", SpatialGridHead.sharing(model.head, grid=2))
    assert set(model.state_dict()) == keys
    images = torch.randn(1, 3, 64, 64)
    before = model(images).local
    with torch.no_grad():
        model.head.linear.weight.mul_(-1)
        model.head.linear.bias.mul_(-1)
    torch.testing.assert_close(model(images).local, -before)


@pytest.mark.parametrize(
    "backbone, kwargs", [("timm:resnet10t", None), ("timm:vit_tiny_patch16_224", {"img_size": 64})]
)
def test_training_free_grid_on_timm_cnns_and_vit_token_grids(backbone, kwargs):
    model = build_model(backbone, 8, timm_kwargs=kwargs)
    model.add_head("spatial", SpatialGridHead.sharing(model.head, grid=4))
    out = model(torch.randn(2, 3, 64, 64))
    assert out.local.shape == (2, 16, 8)
    torch.testing.assert_close(out.local.norm(dim=-1), torch.ones(2, 16))


@pytest.mark.parametrize("own", [False, True])
@pytest.mark.parametrize("h, w, grid", [(7, 7, 4), (7, 5, 2), (2, 2, 4), (14, 14, 4), (4, 4, 4)])
def test_the_head_equals_projecting_every_location_then_resampling(own, h, w, grid):
    """Resampling first (fewer cells than locations) gives the per-location projection's grid:
    values and gradients of the features and of the layer's weights."""
    torch.manual_seed(0)
    glob = GlobalHead(12, 6)
    head = SpatialGridHead(12, 6, grid) if own else SpatialGridHead.sharing(glob, grid)
    fmap = torch.randn(3, 12, h, w, dtype=torch.float64, requires_grad=True)
    head, glob = head.double(), glob.double()
    weight = torch.randn(3, grid * grid, 6, dtype=torch.float64)
    params = list(head.parameters() if own else glob.parameters())  # the layer W, b the grid is made with

    local = head(fmap, None, None)["local"]
    (local * weight).sum().backward()
    got = (local.detach(), fmap.grad.clone(), [p.grad.clone() for p in params])
    fmap.grad = None
    for p in params:
        p.grad = None

    per_location = head.conv(fmap) if own else torch.einsum("dc,bchw->bdhw", glob.linear.weight, fmap)
    if not own:
        per_location = per_location + glob.linear.bias[:, None, None]
    reference = torch.stack(
        [torch.tensor(_bilinear(m.tolist(), 4 * grid)) for m in per_location.detach()]
    )  # written-out bilinear, for the values
    cells = torch.nn.functional.avg_pool2d(reference, 4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got[0], torch.nn.functional.normalize(cells, dim=-1).to(got[0]))

    from glassmetric.models.spatial_head import feature_map_to_grid

    (feature_map_to_grid(per_location, grid) * weight).sum().backward()  # projecting first, for the gradients
    torch.testing.assert_close(got[1], fmap.grad)
    for g, p in zip(got[2], params, strict=True):
        torch.testing.assert_close(g, p.grad)
