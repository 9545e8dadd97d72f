"""Introspective distance against brute-force double loops and the authors' release formula."""

from __future__ import annotations

import math

import pytest
import torch

from glassmetric.errors import ConfigError
from glassmetric.similarity.introspective import (
    MAX_EXPONENT,
    IntrospectiveParams,
    image_uncertainty,
    introspective_distance,
    introspective_distance_matrix,
)


def _unit(row):
    n = math.sqrt(sum(v * v for v in row))
    return [v / n for v in row]


def brute_force(s_q, u_q, s_r, u_r, p: IntrospectiveParams):
    out = []
    for i in range(len(s_q)):
        row = []
        for j in range(len(s_r)):
            a, b = _unit(s_q[i]), _unit(s_r[j])
            alpha = sum((x - y) ** 2 for x, y in zip(a, b, strict=True))
            uq = u_q[i] if u_q is not None else [0.0] * len(u_r[0])
            ur = u_r[j] if u_r is not None else [0.0] * len(uq)
            beta = sum((x - y) ** 2 for x, y in zip(uq, ur, strict=True))
            ratio = (p.beta_scale * beta + p.beta_offset) / (p.alpha_scale * alpha + p.alpha_offset)
            row.append(alpha * math.exp(-min(ratio, MAX_EXPONENT)))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "params", [IntrospectiveParams(), IntrospectiveParams(2.0, 0.1, 0.5, 1.0), IntrospectiveParams(1.0, 0.0, 3.0, 0.0)]
)
def test_matrix_matches_double_loop(seed, params):
    g = torch.Generator().manual_seed(seed)
    s_q, s_r = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(7, 6, generator=g, dtype=torch.float64)
    u_q, u_r = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    got = introspective_distance_matrix(s_q, u_q, s_r, u_r, params)
    expected = brute_force(s_q.tolist(), u_q.tolist(), s_r.tolist(), u_r.tolist(), params)
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_references_without_uncertainty_are_certain():
    """Proxies (no uncertainty embedding) count as zero uncertainty, on either side."""
    g = torch.Generator().manual_seed(3)
    s_q, u_q, proxies = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g), torch.randn(5, 6, generator=g)
    got = introspective_distance_matrix(s_q, u_q, proxies, None)
    assert torch.allclose(got, introspective_distance_matrix(s_q, u_q, proxies, torch.zeros(5, 3)))
    assert torch.allclose(introspective_distance_matrix(proxies, None, s_q, u_q), got.T)


def test_similarity_equals_the_release_formula():
    """1 - D/2 = 1 - (1 - cos) exp(-(beta + 4) / (5 ||s - s'||^2)) (the release's ProxyAnchor)."""
    g = torch.Generator().manual_seed(4)
    s, u = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1), torch.randn(6, 8, generator=g)
    cos = s @ s.T
    beta = torch.cdist(u, u) ** 2
    mu = torch.cdist(s, s) ** 2
    off = ~torch.eye(6, dtype=torch.bool)
    release = 1 - (1 - cos) * torch.exp(-(beta + 4) / (5 * mu))
    ours = 1 - 0.5 * introspective_distance_matrix(s, u, s, u)
    assert torch.allclose(ours[off], release[off], atol=1e-5)


def test_no_shrinkage_without_offset_and_uncertainty_difference():
    s = torch.nn.functional.normalize(torch.randn(4, 5), dim=1)
    u = torch.ones(4, 2)  # equal uncertainties: beta = 0
    d = introspective_distance_matrix(s, u, s, u, IntrospectiveParams(beta_offset=0.0))
    assert torch.allclose(d, (torch.cdist(s, s) ** 2), atol=1e-5)


def test_uncertainty_difference_shrinks_the_distance():
    s = torch.nn.functional.normalize(torch.randn(2, 5), dim=1)
    calm = introspective_distance_matrix(s[:1], torch.zeros(1, 2), s[1:], torch.zeros(1, 2))
    unsure = introspective_distance_matrix(s[:1], torch.zeros(1, 2), s[1:], torch.full((1, 2), 3.0))
    assert float(unsure) < float(calm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_to_zero_gives_finite_values_and_gradients(dtype):
    """Identical semantic embeddings (alpha = 0) and near-identical ones: no NaN or inf."""
    s = torch.randn(1, 6, dtype=dtype).repeat(3, 1)
    s[2] += 1e-4
    s.requires_grad_(True)
    u = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    d = introspective_distance_matrix(s, u, s, u)
    assert torch.isfinite(d).all() and (d >= 0).all()
    assert float(d[0, 1].detach()) < 1e-30  # alpha ~ rounding, shrunk by exp(-80)
    d.sum().backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(u.grad).all()
    alpha = torch.zeros(3, requires_grad=True)
    out = introspective_distance(alpha, torch.zeros(3))
    out.sum().backward()
    assert torch.isfinite(alpha.grad).all()


def test_bad_params_name_the_key():
    with pytest.raises(ConfigError, match=r"introspective\.alpha_scale"):
        IntrospectiveParams(alpha_scale=0.0)
    with pytest.raises(ConfigError, match=r"introspective\.beta_offset"):
        IntrospectiveParams(beta_offset=-1.0)


def test_image_uncertainty_is_the_norm():
    u = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert image_uncertainty(u).tolist() == [5.0, 0.0]
