"""Spatial grid head: brute-force per-location projection, resampling, sharing the global head."""

import pytest
import torch
import torch.nn.functional as F

from glassmetric.models import build_model
from glassmetric.models.global_head import GlobalHead
from glassmetric.models.output import EmbeddingOutput
from glassmetric.models.spatial_head import SpatialGridHead, resample_to_grid


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


def test_grid_resampling_matches_a_brute_force_average():
    x = torch.randn(1, 3, 8, 8)
    # an 8x8 map resampled to 4x4: bilinear up to 16x16 (exact 2x), then 4x4 block means
    up = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    expected = torch.stack([torch.stack([up[0, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean(dim=(1, 2)) for j in range(4)], -1) for i in range(4)], -2)
    torch.testing.assert_close(resample_to_grid(x, 4)[0], expected)


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


@pytest.mark.parametrize("backbone, kwargs", [("timm:resnet10t", None), ("timm:vit_tiny_patch16_224", {"img_size": 64})])
def test_training_free_grid_on_timm_cnns_and_vit_token_grids(backbone, kwargs):
    model = build_model(backbone, 8, timm_kwargs=kwargs)
    model.add_head("spatial", SpatialGridHead.sharing(model.head, grid=4))
    out = model(torch.randn(2, 3, 64, 64))
    assert out.local.shape == (2, 16, 8)
    torch.testing.assert_close(out.local.norm(dim=-1), torch.ones(2, 16))
