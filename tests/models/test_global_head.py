"""GlobalHead: pooling against brute-force references, normalisation, per-location projection."""

from __future__ import annotations

import pytest
import torch

from glassmetric.errors import ConfigError
from glassmetric.models import POOLINGS, GlobalHead, gem_pool

torch.manual_seed(0)
FMAP = torch.rand(3, 8, 4, 5) + 0.1  # positive, like post-ReLU features


def _brute_force_pool(fmap: torch.Tensor, pooling: str, p: float = 3.0) -> torch.Tensor:
    b, c, h, w = fmap.shape
    out = torch.zeros(b, c, dtype=fmap.dtype)
    for i in range(b):
        for k in range(c):
            values = [fmap[i, k, y, x] for y in range(h) for x in range(w)]
            mean = sum(values) / len(values)
            peak = max(values)
            gem = (sum(v.clamp(min=1e-6) ** p for v in values) / len(values)) ** (1 / p)
            out[i, k] = {"avg": mean, "max": peak, "avgmax": mean + peak, "gem": gem}[pooling]
    return out


@pytest.mark.parametrize("pooling", POOLINGS)
def test_pooling_matches_brute_force(pooling: str) -> None:
    head = GlobalHead(8, 4, pooling=pooling)
    embedding, pooled = head(FMAP)
    assert embedding.shape == (3, 4) and pooled.shape == (3, 8)
    torch.testing.assert_close(pooled, _brute_force_pool(FMAP, pooling), rtol=1e-5, atol=1e-6)


def test_gem_p1_is_avg_and_large_p_tends_to_max() -> None:
    torch.testing.assert_close(gem_pool(FMAP, 1.0), FMAP.mean(dim=(2, 3)))
    head = GlobalHead(8, 4, pooling="gem", gem_p=1.0)
    torch.testing.assert_close(head(FMAP)[1], FMAP.mean(dim=(2, 3)))
    torch.testing.assert_close(gem_pool(FMAP.double(), 200.0), FMAP.double().amax(dim=(2, 3)), rtol=2e-2, atol=0)


def test_gem_p_is_learnable_and_clamps_negatives() -> None:
    head = GlobalHead(8, 4, pooling="gem")
    assert head.gem_p.requires_grad and head.gem_p.item() == pytest.approx(3.0)
    fmap = torch.randn(2, 8, 3, 3)  # negative values must not give NaN
    embedding, pooled = head(fmap)
    assert torch.isfinite(pooled).all() and (pooled > 0).all()
    embedding.sum().backward()
    assert head.gem_p.grad is not None and torch.isfinite(head.gem_p.grad).all()


@pytest.mark.parametrize("pooling", POOLINGS)
def test_embedding_is_unit_norm(pooling: str) -> None:
    embedding, _pooled = GlobalHead(8, 16, pooling=pooling)(FMAP)
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(3))


def test_normalize_false_returns_linear_output() -> None:
    head = GlobalHead(8, 16, normalize=False)
    embedding, pooled = head(FMAP)
    torch.testing.assert_close(embedding, head.linear(pooled))


def test_linear_init_kaiming_fan_out() -> None:
    head = GlobalHead(512, 128)
    assert torch.count_nonzero(head.linear.bias) == 0
    expected_std = (2.0 / 128) ** 0.5  # kaiming normal, fan_out = embedding_dim
    assert head.linear.weight.std().item() == pytest.approx(expected_std, rel=0.05)


def test_project_equals_per_location_linear() -> None:
    head = GlobalHead(8, 6)
    projected = head.project(FMAP)
    assert projected.shape == (3, 6, 4, 5)
    for i in range(3):
        for y in range(4):
            for x in range(5):
                torch.testing.assert_close(projected[i, :, y, x], head.linear(FMAP[i, :, y, x]))
    normalized = head.project(FMAP, normalize=True)
    torch.testing.assert_close(normalized.norm(dim=1), torch.ones(3, 4, 5))
    flat = torch.rand(3, 8, 7)  # any trailing shape
    torch.testing.assert_close(head.project(flat)[:, :, 2], head.linear(flat[:, :, 2]))
    torch.testing.assert_close(head.project(flat[:, :, 0]), head.linear(flat[:, :, 0]))


def test_project_rejects_wrong_channels() -> None:
    with pytest.raises(ValueError, match="project expects"):
        GlobalHead(8, 6).project(torch.rand(2, 7, 3, 3))


def test_bad_pooling_name() -> None:
    with pytest.raises(ConfigError, match="'median'"):
        GlobalHead(8, 4, pooling="median")


@pytest.mark.parametrize("args", [(0, 4), (8, 0)])
def test_bad_sizes(args) -> None:
    with pytest.raises(ConfigError):
        GlobalHead(*args)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_identity_init_starts_from_the_pooled_feature(pooling: str) -> None:
    head = GlobalHead(8, 8, pooling=pooling, init="identity")
    embedding, pooled = head(FMAP)
    assert torch.allclose(embedding, torch.nn.functional.normalize(pooled, dim=1), atol=1e-6)


def test_identity_init_needs_matching_dimensions() -> None:
    with pytest.raises(ConfigError, match=r"model\.head_init.*8 channels.*got 4"):
        GlobalHead(8, 4, init="identity")
    with pytest.raises(ConfigError, match="unknown head init 'orthogonal'"):
        GlobalHead(8, 8, init="orthogonal")
