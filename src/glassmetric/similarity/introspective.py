"""Introspective similarity (IDML; Wang, Zheng, Zhu, Zhou & Lu, "Introspective Deep Metric
Learning", TPAMI 2023).

Every image has a semantic embedding s (L2-normalised) and an uncertainty embedding u (NOT
normalised: normalising it makes every uncertainty the same). Two images are compared by the
introspective distance

    alpha = ||s_x - s_y||^2                 semantic distance (of unit vectors: 2 - 2 cos)
    beta  = ||u_x - u_y||^2                 uncertainty distance
    D     = alpha * exp(-(b_s beta + b_0) / (a_s alpha + a_0))

the paper's D = alpha exp(-beta / alpha) with a scale and an offset on each term. The defaults
(a_s = 5, a_0 = 0, b_s = 1, b_0 = 4) are those of the authors' release, whose ProxyAnchor
similarity is ``1 - (1 - cos) exp(-(beta + 4) / (5 alpha))``. A pair whose uncertainties differ
has its semantic distance shrunk: the loss pushes less on pairs it cannot judge. Proxies and
other references without an uncertainty embedding carry zero uncertainty.

Numerics: the exponent is clamped at ``MAX_EXPONENT``, so D, and its gradient, stay finite as
alpha -> 0 (where the unclamped gradient would be 0 * inf).

Retrieval ranks by the semantic cosine; :func:`image_uncertainty` gives the per-image score
shown to people: ``||u||``, the square root of the uncertainty distance to a certain
(zero-uncertainty) reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glassmetric.errors import ConfigError

#: largest exponent of exp(-(...)) kept; exp(-80) ~ 1.8e-35 is still a normal float32
MAX_EXPONENT = 80.0
_TINY = 1e-12


@dataclass(frozen=True)
class IntrospectiveParams:
    """Scales and offsets of the introspective distance (defaults: the authors' release)."""

    alpha_scale: float = 5.0
    alpha_offset: float = 0.0
    beta_scale: float = 1.0
    beta_offset: float = 4.0

    def __post_init__(self) -> None:
        for name in ("alpha_scale", "beta_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"introspective.{name}: expected > 0, got {getattr(self, name)!r}")
        for name in ("alpha_offset", "beta_offset"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"introspective.{name}: expected >= 0, got {getattr(self, name)!r}")


def _full(x: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 -> float32 (the exponent needs the range); float32 / float64 kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def squared_distance_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(Q, d), (R, d) -> (Q, R) squared Euclidean distances, clamped at 0 against rounding."""
    sq = (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return sq.clamp(min=0.0)


def shrink_factor(
    alpha: torch.Tensor, beta: torch.Tensor, params: IntrospectiveParams = IntrospectiveParams()
) -> torch.Tensor:
    """exp(-(b_s beta + b_0) / (a_s alpha + a_0)), elementwise, with a bounded exponent."""
    p = params
    ratio = (p.beta_scale * beta + p.beta_offset) / (p.alpha_scale * alpha + p.alpha_offset + _TINY)
    return torch.exp(-ratio.clamp(max=MAX_EXPONENT))


def introspective_distance(
    alpha: torch.Tensor, beta: torch.Tensor, params: IntrospectiveParams = IntrospectiveParams()
) -> torch.Tensor:
    """D = alpha * exp(-(b_s beta + b_0) / (a_s alpha + a_0)) from given alpha and beta."""
    return alpha * shrink_factor(alpha, beta, params)


def introspective_distance_matrix(
    s_query: torch.Tensor,
    u_query: torch.Tensor | None,
    s_ref: torch.Tensor,
    u_ref: torch.Tensor | None,
    params: IntrospectiveParams = IntrospectiveParams(),
) -> torch.Tensor:
    """(Q, R) introspective distances. ``s_*`` are L2-normalised here; a missing ``u_*`` is the
    zero uncertainty (proxies)."""
    s_query = torch.nn.functional.normalize(_full(s_query), dim=1)
    s_ref = torch.nn.functional.normalize(_full(s_ref), dim=1).to(s_query.dtype)
    alpha = (2.0 - 2.0 * (s_query @ s_ref.T)).clamp(min=0.0)
    if u_query is None and u_ref is None:
        return introspective_distance(alpha, torch.zeros_like(alpha), params)
    uq = _full(u_query).to(s_query.dtype) if u_query is not None else None
    ur = _full(u_ref).to(s_query.dtype) if u_ref is not None else None
    if uq is None:
        assert ur is not None  # not both missing (returned above)
        uq = ur.new_zeros(len(s_query), ur.shape[1])
    ur = ur if ur is not None else uq.new_zeros(len(s_ref), uq.shape[1])
    if uq.shape[1] != ur.shape[1]:
        raise ValueError(f"uncertainty embeddings differ in size: {uq.shape[1]} and {ur.shape[1]}")
    beta = squared_distance_matrix(uq, ur)
    return introspective_distance(alpha, beta, params)


def image_uncertainty(uncertainty: torch.Tensor) -> torch.Tensor:
    """(B, Du) uncertainty embeddings -> (B,) per-image uncertainty ``||u||``."""
    return uncertainty.float().norm(dim=1)
