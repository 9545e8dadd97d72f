"""The DGML objective: one loss instance per group, averaged, + diversity (+ structural)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glassmetric.config import load_config
from glassmetric.factory import build_training_loss
from glassmetric.losses.diversity import diversity_loss
from glassmetric.losses.grouped import GroupedLoss
from glassmetric.models.output import EmbeddingOutput
from glassmetric.training.module import MetricLearner


def test_grouped_loss_averages_one_loss_instance_per_group_plus_diversity():
    cfg = load_config(
        "demo_scratch",
        ["model.groups=3", "model.embedding_dim=12", "loss.name=proxyanchor", "loss.diversity_weight=0.5"],
    )
    loss = build_training_loss(cfg, num_classes=4)
    assert isinstance(loss, GroupedLoss) and loss.groups == 3
    assert [tuple(group.loss.proxies.shape) for group in loss.per_group] == [(4, 4)] * 3  # per-group proxies
    torch.manual_seed(0)
    g = F.normalize(torch.randn(8, 3, 4), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = EmbeddingOutput(embedding=g.flatten(1) / math.sqrt(3), group_embeddings=g)
    expected = sum(group(EmbeddingOutput(embedding=g[:, i]), labels) for i, group in enumerate(loss.per_group)) / 3
    expected = expected + 0.5 * diversity_loss(g)
    torch.testing.assert_close(loss(out, labels), expected)


def test_group_learning_rates_are_separate():
    cfg = load_config(
        "demo_scratch",
        [
            "model.groups=2",
            "model.embedding_dim=8",
            "optim.lr=1e-5",
            "optim.grouping_lr=1e-4",
            "optim.query_lr=1e-3",
            "optim.head_lr=5e-5",
        ],
    )
    learner = MetricLearner(cfg, np.arange(6))
    lrs = {g["name"]: g["lr"] for g in learner.configure_optimizers()["optimizer"].param_groups}
    assert lrs == pytest.approx({"backbone": 1e-5, "head": 5e-5, "grouping.kv": 1e-4, "grouping.queries": 1e-3})


def test_group_weight_decays_follow_the_dgml_release():
    cfg = load_config("dgml", ["model.pretrained=false", "model.backbone=resnet18", "model.embedding_dim=12"])
    learner = MetricLearner(cfg, np.arange(6))
    decays = {g["name"]: g["weight_decay"] for g in learner.configure_optimizers()["optimizer"].param_groups}
    assert decays == pytest.approx(
        {"backbone": 3e-3, "head": 3e-3, "grouping.kv": 3e-3, "grouping.queries": 1e-3, "loss": 0.0}
    )


def test_structural_loss_is_added_when_groups_compose_with_a_spatial_head():
    cfg = load_config(
        "demo_scratch",
        [
            "model.groups=2",
            "model.embedding_dim=16",
            "model.spatial_grid=4",
            "model.spatial_head=own",
            "loss.similarity=structural",
        ],
    )
    learner = MetricLearner(cfg, np.arange(10))
    torch.manual_seed(0)
    out = learner.model(torch.randn(6, 3, 64, 64))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    terms = learner.loss.terms(out, labels)
    assert set(terms) == {"metric", "diversity", "structural"}
    total = learner.loss(out, labels)
    torch.testing.assert_close(total, terms["metric"] + 0.02 * terms["diversity"] + terms["structural"])
    total.backward()
    assert learner.model.extra_heads["spatial"].conv.weight.grad.abs().sum() > 0
