"""DGML diversity loss and the grouped objective."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glassmetric.config import load_config
from glassmetric.losses.diversity import diversity_loss
from glassmetric.losses.grouped import GroupedLoss
from glassmetric.models.output import EmbeddingOutput
from glassmetric.training.module import MetricLearner, build_training_loss


def brute_force(f: torch.Tensor) -> float:
    b, k, _ = f.shape
    total = 0.0
    for n in range(b):
        s = 0.0
        for i in range(k):
            for j in range(k):
                if i < j:
                    c = float(F.cosine_similarity(f[n, i], f[n, j], dim=0))
                    s += math.log(1.0 + math.exp(50.0 * (c - 0.5)))
        total += s / (k - 1)
    return total / b


@pytest.mark.parametrize("k", [2, 3, 5])
def test_diversity_loss_equals_a_double_loop(k):
    torch.manual_seed(k)
    f = torch.randn(6, k, 4, dtype=torch.float64)
    f[0, 1] = f[0, 0] * 3 + 0.01  # a nearly identical pair: a large term
    assert float(diversity_loss(f)) == pytest.approx(brute_force(f), rel=1e-6)


def test_diversity_loss_pushes_groups_apart_and_is_zero_for_one_group():
    same = torch.ones(2, 3, 4)
    orthogonal = torch.eye(4)[:3].expand(2, 3, 4)
    assert float(diversity_loss(same)) == pytest.approx(3 * math.log1p(math.exp(25.0)) / 2)
    assert float(diversity_loss(orthogonal)) == pytest.approx(3 * math.log1p(math.exp(-25.0)) / 2)
    assert float(diversity_loss(torch.randn(4, 1, 3))) == 0.0
    f = torch.randn(4, 3, 8, requires_grad=True)
    diversity_loss(f).backward()
    assert f.grad.abs().sum() > 0


def test_grouped_loss_averages_one_loss_instance_per_group_plus_diversity():
    cfg = load_config("demo", ["model.groups=3", "model.embedding_dim=12", "loss.name=proxyanchor", "loss.diversity_weight=0.5"])
    loss = build_training_loss(cfg, num_classes=4)
    assert isinstance(loss, GroupedLoss) and loss.groups == 3
    assert [tuple(l.loss.proxies.shape) for l in loss.per_group] == [(4, 4)] * 3  # per-group proxies
    torch.manual_seed(0)
    g = F.normalize(torch.randn(8, 3, 4), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = EmbeddingOutput(embedding=g.flatten(1) / math.sqrt(3), group_embeddings=g)
    expected = sum(l(EmbeddingOutput(embedding=g[:, i]), labels) for i, l in enumerate(loss.per_group)) / 3
    expected = expected + 0.5 * diversity_loss(g)
    torch.testing.assert_close(loss(out, labels), expected)


def test_group_learning_rates_are_separate():
    cfg = load_config("demo", ["model.groups=2", "model.embedding_dim=8", "optim.lr=1e-5",
                               "optim.grouping_lr=1e-4", "optim.query_lr=1e-3", "optim.head_lr=5e-5"])
    learner = MetricLearner(cfg, np.arange(6))
    lrs = {g["name"]: g["lr"] for g in learner.configure_optimizers()["optimizer"].param_groups}
    assert lrs == pytest.approx({"backbone": 1e-5, "head": 5e-5, "grouping.kv": 1e-4, "grouping.queries": 1e-3})
