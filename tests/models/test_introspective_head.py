"""The uncertainty head of introspective similarity: un-normalised, varied, trained."""

import pytest
import torch

from glassmetric.config import load_config
from glassmetric.errors import ConfigError
from glassmetric.factory import build_model_from_config
from glassmetric.losses.metric_losses import build_loss
from glassmetric.models.introspective_head import UncertaintyHead
from glassmetric.similarity.introspective import IntrospectiveParams, image_uncertainty


def _model(**extra):
    over = ["model.backbone=resnet18", "model.embedding_dim=16", "model.uncertainty_dim=8", "model.pooling=avgmax"]
    return build_model_from_config(load_config("demo_scratch", over + [f"{k}={v}" for k, v in extra.items()]))


def test_uncertainty_is_unnormalised_varies_and_receives_gradient():
    torch.manual_seed(0)
    model = _model()
    images = torch.rand(6, 3, 64, 64)
    out = model(images)
    assert out.uncertainty.shape == (6, 8)
    norms = image_uncertainty(out.uncertainty)
    assert not torch.allclose(norms, torch.ones(6)), "the uncertainty embedding must not be L2-normalised"
    assert float(norms.std()) > 1e-3 * float(norms.mean()), "uncertainty is (nearly) the same for every image"
    assert torch.allclose(out.embedding.norm(dim=1), torch.ones(6), atol=1e-5)  # semantic stays unit-norm
    loss = build_loss("multisimilarity", embedding_dim=16, num_classes=3, introspective_params=IntrospectiveParams())
    value = loss(out, torch.tensor([0, 0, 1, 1, 2, 2]))
    value.backward()
    grad = model.extra_heads["uncertainty"].linear.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_uncertainty_head_reads_the_pooled_feature():
    head = UncertaintyHead(4, 3)
    pooled = torch.randn(2, 4)
    out = head(torch.randn(2, 4, 3, 3), pooled, None)
    assert torch.allclose(out["uncertainty"], head.linear(pooled))


def test_bad_sizes_and_missing_head_are_config_errors():
    with pytest.raises(ConfigError, match=r"model\.uncertainty_dim"):
        UncertaintyHead(4, 0)
    with pytest.raises(ConfigError, match=r"model\.uncertainty_dim"):
        load_config("demo_scratch", ["loss.similarity=introspective"])
    with pytest.raises(ConfigError, match=r"model\.uncertainty_dim"):
        load_config("demo_scratch", ["model.uncertainty_dim=-1"])


def test_composes_with_the_spatial_grid():
    out = _model(**{"model.spatial_grid": 2})(torch.rand(2, 3, 64, 64))
    assert out.local.shape == (2, 4, 16) and out.uncertainty.shape == (2, 8)
