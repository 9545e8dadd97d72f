"""EmbeddingModel: outputs, extra heads, parameter groups, embed()."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from glassmetric.errors import ConfigError
from glassmetric.models import EmbeddingModel, EmbeddingOutput, GlobalHead, build_backbone, build_model

IMAGES = torch.randn(2, 3, 64, 64)


class UncertaintyHead(nn.Module):
    """A toy extra head: reads the pooled feature, sets ``uncertainty``."""

    def __init__(self, in_channels: int, dim: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, dim)
        self.saw_embedding: torch.Tensor | None = None

    def forward(self, feature_map, pooled, output):
        self.saw_embedding = output.embedding
        return {"uncertainty": self.fc(pooled)}


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return build_model("resnet18", 32, pooling="gem")


def test_forward_fills_output(model: EmbeddingModel) -> None:
    out = model(IMAGES)
    assert isinstance(out, EmbeddingOutput)
    assert out.embedding.shape == (2, 32)
    assert out.feature_map.shape == (2, 512, 2, 2)
    assert out.pooled.shape == (2, 512)
    torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(2))
    assert set(out.present()) == {"embedding", "feature_map", "pooled"}
    assert model.embedding_dim == 32
    assert model.backbone.mean == (0.485, 0.456, 0.406) and len(model.backbone.std) == 3


def test_vit_model_forward() -> None:
    vit = build_model("timm:vit_tiny_patch16_224", 16, pooling="avgmax", timm_kwargs={"img_size": 64})
    out = vit(IMAGES)
    assert out.feature_map.shape == (2, 192, 4, 4) and out.embedding.shape == (2, 16)


def test_parameter_groups_partition_trainable_parameters(model: EmbeddingModel) -> None:
    groups = model.parameter_groups()
    assert list(groups) == ["backbone", "head"]
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == sum(1 for _ in model.parameters())
    assert any(p is model.head.gem_p for p in groups["head"])


def test_parameter_groups_skip_frozen_bn() -> None:
    frozen = build_model("resnet18", 8, frozen_bn=True)
    bn_params = {id(p) for bn in frozen.backbone.batchnorm_layers() for p in bn.parameters()}
    backbone_ids = {id(p) for p in frozen.parameter_groups()["backbone"]}
    assert bn_params and not bn_params & backbone_ids
    frozen.train()
    assert all(not bn.training for bn in frozen.backbone.batchnorm_layers())


def test_add_head_fills_field_and_group() -> None:
    model = build_model("timm:resnet10t", 16)
    extra = UncertaintyHead(model.backbone.out_channels)
    model.add_head("uncertainty", extra)
    out = model(IMAGES)
    assert out.uncertainty.shape == (2, 5)
    assert extra.saw_embedding is out.embedding  # runs after the global head
    groups = model.parameter_groups()
    assert list(groups) == ["backbone", "head", "uncertainty"]
    assert {id(p) for p in groups["uncertainty"]} == {id(p) for p in extra.parameters()}
    out.uncertainty.sum().backward()
    assert extra.fc.weight.grad is not None


def test_add_head_rejects_bad_names_and_fields(model: EmbeddingModel) -> None:
    with pytest.raises(ConfigError):
        model.add_head("backbone", nn.Identity())
    with pytest.raises(ConfigError):
        model.add_head("not a name", nn.Identity())

    class BadHead(nn.Module):
        def forward(self, feature_map, pooled, output):
            return {"colour": pooled}

    broken = build_model("timm:mobilenetv3_small_050", 8)
    broken.add_head("bad", BadHead())
    with pytest.raises(ConfigError, match=r"'bad'.*colour"):
        broken(IMAGES)
    with pytest.raises(ConfigError, match="already"):
        broken.add_head("bad", BadHead())


def test_embed_no_grad_eval_and_restores_mode(model: EmbeddingModel) -> None:
    model.train()
    model.eval()
    expected = model(IMAGES).embedding
    model.train()
    before = [bn.running_mean.clone() for bn in model.backbone.batchnorm_layers()]
    embedding = model.embed(IMAGES)
    assert not embedding.requires_grad
    torch.testing.assert_close(embedding, expected)
    assert model.training and model.backbone.trunk.layer1.training
    for old, bn in zip(before, model.backbone.batchnorm_layers(), strict=True):
        assert torch.equal(old, bn.running_mean)


def test_mismatched_head_rejected() -> None:
    with pytest.raises(ConfigError, match="512"):
        EmbeddingModel(build_backbone("resnet18"), GlobalHead(2048, 8))
