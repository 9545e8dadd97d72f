"""DGML diversity loss: brute force, limits, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from glassmetric.losses.diversity import diversity_loss


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
