r"""Structural similarity of DIML (Zhao et al., "Towards Interpretable Deep Metric Learning with
Structural Matching", ICCV 2021).

An image ``x`` is described by ``N = g*g`` L2-normalised local embeddings ``x_1..x_N`` (its cells)
and one L2-normalised global embedding ``gx``; the same for ``y``. Then (paper, Sec. 3):

* local similarity and cost: :math:`S_{ij} = \cos(x_i, y_j) = x_i^\top y_j`, :math:`C = 1 - S`;
* cross-correlation marginals (each cell weighted by how well it agrees with the OTHER image):
  :math:`\mu_i = \frac{\max(0, x_i^\top g_y)}{\sum_k \max(0, x_k^\top g_y)}`,
  :math:`\nu_j = \frac{\max(0, y_j^\top g_x)}{\sum_k \max(0, y_k^\top g_x)}`;
  ``mu`` indexes the rows of ``T`` (x's cells), ``nu`` its columns (y's cells). (The original
  release passed them to the wrong sides in its losses.) When a marginal's mass
  :math:`\sum_k \max(0, \cdot)` is below :data:`MIN_MASS` (e.g. every correlation is negative),
  that marginal falls back to uniform ``1/N`` for that pair. With
  ``marginals="pooled_cross_correlation"`` the reference of each image is the mean of its own
  cells, :math:`\bar g_y = \mathrm{normalise}(\frac1M \sum_j y_j)`, in place of ``g_y``: for
  local embeddings from a head of their own (``model.spatial_head: own``), whose space is not
  the global embedding's (e.g. the concatenated group embeddings of DGML), so the product
  :math:`x_i^\top g_y` would compare two unrelated spaces;
* transport plan: :math:`T = \arg\min_{T1=\mu, T^\top1=\nu} \langle T, C\rangle - \varepsilon H(T)`
  by :func:`glassmetric.similarity.sinkhorn.sinkhorn` (log domain, epsilon 0.05);
* structural similarity :math:`SS = \sum_{ij} T_{ij} S_{ij} \in [-1, 1]` (``T`` is a
  probability matrix and ``|S| <= 1``); multi-scale ranking score
  :math:`s = \cos(g_x, g_y) + SS`.

Inputs
------
Every embedding must be L2-normalised along its last dimension: the public functions
(:func:`structural_similarity`, :func:`structural_similarity_matrix`, :func:`explain_pair`,
:func:`compute_marginals`, :func:`multiscale_score`) check it once per call
(:func:`check_normalised`: one norm pass, one host sync) and raise a ValueError naming the
argument and the worst norm found. An all-zero row (what ``torch.nn.functional.normalize``
makes of a zero vector: a cell with no feature) is accepted; its similarities are 0, so SS
stays in [-1, 1].

The OT settings come either as keywords (``epsilon``, ``iters``, ``tol``, ``marginals``,
``gradient``, whose defaults are :class:`~glassmetric.similarity.ot_settings.OTSettings`'s) or
as one ``settings=OTSettings(...)`` (e.g. ``OTSettings.from_config(cfg)``), not both.

Shapes and broadcasting
-----------------------
Local inputs are ``(..., N, D)``, global inputs ``(..., D)``. The leading ("batch") dimensions
of the two sides are aligned on the LEFT: the side with fewer of them gets singleton
dimensions appended after its own, then the usual broadcasting applies. So

* one pair: ``(N, D)`` and ``(N, D)`` -> scalar;
* a batch of pairs: ``(B, N, D)`` and ``(B, N, D)`` -> ``(B,)``;
* a query x candidates block: query ``(Q, N, D)`` and candidates ``(Q, K, N, D)`` -> ``(Q, K)``;
* one query against many: ``(N, D)`` and ``(K, N, D)`` -> ``(K,)``.

The B x B (or B x B') matrix of a whole batch is :func:`structural_similarity_matrix`, chunked
over rows.

Precision and gradients
-----------------------
``S`` and the marginals are computed in float32 (float64 for float64 inputs) with autocast
disabled; results are float32 (float64). ``S`` used for the cost is clamped to ``[-1, 1]`` (the
inputs are normalised, so this only removes rounding) which bounds the cost spread by 2 and lets
the solver use its fast shifted-kernel path when ``2 / epsilon <= 50``; ``SS`` uses the
unclamped ``S``. With a constant plan (the default ``gradient``) on that path, the kernel
``exp(clamp(S) / eps)`` (a constant multiple of ``exp(-C / eps)``, entries within
``exp(+-1/eps)``) is formed straight from ``S`` in one pass plus two in place, with no cost
matrix and no row minimum (:func:`glassmetric.similarity.sinkhorn._plan_from_similarity`).

With the default ``gradient="none_through_plan"`` the plan ``T`` is a constant, so
``dSS/dS = T`` and gradients reach the LOCAL embeddings only, through ``S``. The marginals feed
only ``T``; they are computed without autograd, so the GLOBAL embeddings receive no gradient
from ``SS`` (they do from the ``cos(gx, gy)`` term of :func:`multiscale_score`). With
``gradient="unrolled"`` gradients also flow through the Sinkhorn iterations into ``S`` (via ``C``)
and into the marginals, hence into the global embeddings.

Solvers: constant plans of float32 CPU inputs (training losses included) are solved on the
native lane kernel (:mod:`glassmetric.similarity.lane_sinkhorn`: the same iterations and
per-problem stops, 16 problems per SIMD lane), which also writes out the plan as ``dSS/dS``
when ``S`` needs a gradient; the torch solver takes every other case (float64, accelerators,
``gradient="unrolled"``, ``2 / epsilon > 50``, no C compiler). Both give the same ``SS`` and
gradients to float32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from glassmetric.similarity import lane_sinkhorn
from glassmetric.similarity.ot_settings import OTSettings
from glassmetric.similarity.sinkhorn import (
    KERNEL_RANGE_LIMIT,
    GradientMode,
    _check_gradient,
    _plan_from_similarity,
    sinkhorn,
)

__all__ = [
    "MIN_MASS",
    "StructuralExplanation",
    "check_normalised",
    "compute_marginals",
    "cross_correlation_marginals",
    "explain_pair",
    "global_similarity",
    "local_similarity",
    "multiscale_score",
    "pooled_cells",
    "structural_similarity",
    "structural_similarity_matrix",
    "uniform_marginals",
]

MarginalKind = Literal["cross_correlation", "pooled_cross_correlation", "uniform"]

#: A cross-correlation marginal whose total mass is below this falls back to uniform.
MIN_MASS = 1e-8

#: Spread bound of the cost ``1 - S`` with ``S`` clamped to [-1, 1].
_COST_RANGE = 2.0

#: Largest accepted ``|norm - 1|`` of an embedding row, per dtype: the rounding of a unit vector
#: stored in that dtype is far below it (a relative 2^-9 per entry in bfloat16, 2^-12 in
#: float16), a forgotten normalisation far above it.
NORM_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
_NORM_TOLERANCE_DEFAULT = 1e-3


def check_normalised(**embeddings: Tensor | None) -> None:
    """Raise a ValueError unless every given tensor is L2-normalised along its last dimension.

    A row passes when ``|norm - 1| <=`` :data:`NORM_TOLERANCE` of its dtype (1e-3 for float32 /
    float64) or when it is all zeros (``normalize`` of a zero vector). None values are skipped.
    One norm pass per tensor and one host sync for all of them; the message names the argument
    and its worst norm: ``check_normalised(x_local=x, x_global=g)``.
    """
    named = [(k, t) for k, t in embeddings.items() if t is not None and t.numel() > 0]
    if not named:
        return
    worst_rows = []
    with torch.no_grad():
        for _, t in named:
            wide = torch.float64 if t.dtype == torch.float64 else torch.float32
            norm = torch.linalg.vector_norm(t.detach(), dim=-1, dtype=wide).flatten()
            off = torch.where(norm == 0, 0.0, (norm - 1).abs()).nan_to_num_(nan=float("inf"))
            worst = off.argmax()
            worst_rows.append(torch.stack([off[worst], norm[worst]]))
        found = torch.stack(worst_rows).tolist()  # the one host sync
    for (name, t), (off, norm) in zip(named, found, strict=True):
        limit = NORM_TOLERANCE.get(t.dtype, _NORM_TOLERANCE_DEFAULT)
        if not off <= limit:  # also NaN
            raise ValueError(
                f"{name} must be L2-normalised along its last dimension (|norm - 1| <= {limit:g} "
                f"for {str(t.dtype).removeprefix('torch.')}, or an all-zero row); its worst row "
                f"has norm {norm:.6g}: apply torch.nn.functional.normalize(..., dim=-1) first"
            )


class _Unset:
    """A keyword left out: it takes :class:`OTSettings`'s value (the one a signature shows)."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


_DEFAULT_OT = OTSettings()
# cast: a sentinel stands in a signature for a value of the parameter's type (its repr is
# OTSettings's default); _ot_settings replaces it before anything reads it
_EPSILON = cast(float, _Unset(_DEFAULT_OT.epsilon))
_ITERS = cast(int, _Unset(_DEFAULT_OT.iters))
_TOL = cast("float | None", _Unset(_DEFAULT_OT.tol))
_MARGINALS = cast(MarginalKind, _Unset(_DEFAULT_OT.marginals))
_GRADIENT = cast(GradientMode, _Unset(_DEFAULT_OT.gradient))


def _ot_settings(settings: OTSettings | None, **given) -> OTSettings:
    """``settings``, or the keywords ``given`` (left-out ones at OTSettings's defaults); both is
    a ValueError."""
    passed = sorted(k for k, v in given.items() if not isinstance(v, _Unset))
    if settings is not None:
        if not isinstance(settings, OTSettings):
            raise TypeError(f"settings must be an OTSettings, got {type(settings).__name__}")
        if passed:
            raise ValueError(
                f"give the OT settings either as settings= or as keywords, not both "
                f"(got settings and {', '.join(passed)})"
            )
        return settings
    values = {k: v.value if isinstance(v, _Unset) else v for k, v in given.items()}
    if "gradient" in values:
        _check_gradient(values["gradient"])
    return OTSettings(**values)


def _product_group(queries: int) -> int:
    """Queries per batched product on the CPU path of :func:`_gathered_block_scores`: one per
    torch thread, so each thread computes a whole query's product (1.1-1.4x over splitting
    each)."""
    return max(1, min(torch.get_num_threads(), queries))


def _cdtype(*tensors: Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _no_autocast(t: Tensor):
    return torch.autocast(t.device.type, enabled=False)


def local_similarity(x_local: Tensor, y_local: Tensor) -> Tensor:
    r"""Local similarities ``S_ij = x_i . y_j`` (the cosine, the inputs being L2-normalised).

    ``(..., N, D), (..., M, D) -> (..., N, M)``; leading dims broadcast in the usual
    (right-aligned) way; float32 (float64 for float64 inputs) compute, autocast disabled.
    """
    dt = _cdtype(x_local, y_local)
    with _no_autocast(x_local):
        return torch.einsum("...nd,...md->...nm", x_local.to(dt), y_local.to(dt))


def cross_correlation_marginals(x_local: Tensor, y_global: Tensor, *, min_mass: float = MIN_MASS) -> Tensor:
    r"""Marginal over x's cells from the other image's global embedding.

    :math:`w_i = \max(0, x_i^\top g_y)`, :math:`\mu_i = w_i / \sum_k w_k`, or ``1/N`` for every
    ``i`` where :math:`\sum_k w_k <` ``min_mass``. Shapes ``(..., N, D), (..., D) -> (..., N)``
    (right-aligned broadcasting). Call it as ``mu = f(x_local, y_global)``,
    ``nu = f(y_local, x_global)``.
    """
    dt = _cdtype(x_local, y_global)
    with _no_autocast(x_local):
        corr = torch.einsum("...nd,...d->...n", x_local.to(dt), y_global.to(dt))
        return _normalise_correlations(corr, min_mass)


def _normalise_correlations(corr: Tensor, min_mass: float = MIN_MASS) -> Tensor:
    """``relu(corr)`` normalised over the last dim; uniform where its mass is below ``min_mass``."""
    w = torch.relu(corr)
    mass = w.sum(-1, keepdim=True)
    ok = mass >= min_mass
    n = w.shape[-1]
    return torch.where(ok, w / torch.where(ok, mass, torch.ones_like(mass)), 1.0 / n)


def pooled_cells(x_local: Tensor) -> Tensor:
    """``normalise(mean_i x_i)``: ``(..., N, D) -> (..., D)``, the reference embedding of an
    image in its cells' own space (``"pooled_cross_correlation"`` marginals)."""
    dt = _cdtype(x_local)
    with _no_autocast(x_local):
        return torch.nn.functional.normalize(x_local.to(dt).mean(-2), dim=-1)


def _marginal_references(x_local, y_local, x_global, y_global, kind):
    """``(x reference, y reference, kind)``: what the marginals weigh the cells against.
    ``"pooled_cross_correlation"`` is ``"cross_correlation"`` against each image's
    :func:`pooled_cells` in place of its global embedding; other kinds pass through."""
    if kind == "pooled_cross_correlation":
        return pooled_cells(x_local), pooled_cells(y_local), "cross_correlation"
    return x_global, y_global, kind


def uniform_marginals(x_local: Tensor) -> Tensor:
    """``1/N`` for each of the ``N`` cells of ``x_local (..., N, D)``: shape ``(..., N)``."""
    n = x_local.shape[-2]
    return torch.full(x_local.shape[:-1], 1.0 / n, dtype=_cdtype(x_local), device=x_local.device)


def compute_marginals(
    x_local: Tensor,
    y_local: Tensor,
    x_global: Tensor | None = None,
    y_global: Tensor | None = None,
    kind: MarginalKind = "cross_correlation",
) -> tuple[Tensor, Tensor]:
    """``(mu, nu)``: row marginal over x's cells and column marginal over y's cells.

    ``"cross_correlation"``: ``mu = f(x_local, y_global)``, ``nu = f(y_local, x_global)`` with
    ``f`` = :func:`cross_correlation_marginals` (needs both globals);
    ``"pooled_cross_correlation"``: the same against each image's :func:`pooled_cells` (the
    globals are not used); ``"uniform"``: ``1/N`` each. Inputs must be L2-normalised
    (:func:`check_normalised`) and already aligned for broadcasting (as
    :func:`structural_similarity` does).
    """
    _check_inputs(x_local, y_local, x_global, y_global, kind)
    return _compute_marginals(x_local, y_local, x_global, y_global, kind)


def _compute_marginals(x_local, y_local, x_global, y_global, kind) -> tuple[Tensor, Tensor]:
    """:func:`compute_marginals` without the input check."""
    if kind == "uniform":
        return uniform_marginals(x_local), uniform_marginals(y_local)
    x_global, y_global, kind = _marginal_references(x_local, y_local, x_global, y_global, kind)
    if kind != "cross_correlation":
        raise ValueError(
            f"marginals must be 'cross_correlation', 'pooled_cross_correlation' or 'uniform', got {kind!r}"
        )
    if x_global is None or y_global is None:
        raise ValueError("cross-correlation marginals need both global embeddings")
    mu = cross_correlation_marginals(x_local, y_global)  # x's cells vs the OTHER image
    nu = cross_correlation_marginals(y_local, x_global)
    return mu, nu


def _align(x_local, y_local, x_global, y_global):
    """Left-align the batch dims of the two sides (see the module docstring)."""
    if x_local.ndim < 2 or y_local.ndim < 2:
        raise ValueError("local embeddings must be (..., N, D)")
    if x_local.shape[-1] != y_local.shape[-1]:
        raise ValueError(f"embedding sizes differ: {x_local.shape[-1]} vs {y_local.shape[-1]}")
    bx, by = x_local.ndim - 2, y_local.ndim - 2
    for name, g, b in (("x_global", x_global, bx), ("y_global", y_global, by)):
        if g is not None and g.ndim != b + 1:
            raise ValueError(f"{name} must have its local input's batch dims plus D, got {tuple(g.shape)}")
    if bx < by:
        k = by - bx
        x_local = x_local.reshape(*x_local.shape[:bx], *([1] * k), *x_local.shape[bx:])
        if x_global is not None:
            x_global = x_global.reshape(*x_global.shape[:bx], *([1] * k), x_global.shape[-1])
    elif by < bx:
        k = bx - by
        y_local = y_local.reshape(*y_local.shape[:by], *([1] * k), *y_local.shape[by:])
        if y_global is not None:
            y_global = y_global.reshape(*y_global.shape[:by], *([1] * k), y_global.shape[-1])
    return x_local, y_local, x_global, y_global


def _s_and_cross_correlation_marginals(x_local, y_local, x_global, y_global):
    """``S`` and the (constant) cross-correlation marginals in one pass over ``y_local``.

    ``[x_local; x_global] y_local^T`` (one einsum, as :func:`local_similarity`) gives ``S`` (rows ``:N``) and the correlations of y's
    cells with x's global embedding (row ``N``, ``nu``'s input) together, so the (usually
    large, gathered) ``y_local`` is read once. ``mu``'s correlations only read ``x_local`` and
    ``y_global``. ``x_global`` enters detached, so it gets no gradient (as with the separate
    computation, where the marginals carry no graph).
    """
    dt = _cdtype(x_local, y_local, x_global, y_global)
    with _no_autocast(x_local):
        xl, yl = x_local.to(dt), y_local.to(dt)
        n = xl.shape[-2]
        xg = x_global.detach().to(dt)[..., None, :].expand(*xl.shape[:-2], 1, xl.shape[-1])
        SX = torch.einsum("...nd,...md->...nm", torch.cat([xl, xg], -2), yl)  # (..., N+1, M)
        S = SX[..., :n, :]
        with torch.no_grad():
            nu = _normalise_correlations(SX[..., n, :])
            mu = cross_correlation_marginals(xl.detach(), y_global.detach())
    return S, mu, nu


def _s_and_marginals(x_local, y_local, x_global, y_global, marginals, gradient):
    """(S, mu, nu) for aligned inputs; the marginals carry a graph only when ``gradient`` is
    ``"unrolled"``."""
    x_global, y_global, marginals = _marginal_references(x_local, y_local, x_global, y_global, marginals)
    if (
        marginals == "cross_correlation"
        and gradient == "none_through_plan"
        and x_global is not None
        and y_global is not None
    ):
        S, mu, nu = _s_and_cross_correlation_marginals(x_local, y_local, x_global, y_global)
    else:
        S = local_similarity(x_local, y_local)
        # with a constant plan, the marginals need no autograd graph
        with torch.set_grad_enabled(torch.is_grad_enabled() and gradient == "unrolled"):
            mu, nu = _compute_marginals(x_local, y_local, x_global, y_global, marginals)
    return S, mu, nu


def _plan_and_s(x_local, y_local, x_global, y_global, epsilon, iters, tol, marginals, gradient):
    """(S, mu, nu, T) for aligned inputs."""
    S, mu, nu = _s_and_marginals(x_local, y_local, x_global, y_global, marginals, gradient)
    return S, mu, nu, _torch_plan(S, mu, nu, epsilon, iters, tol, gradient)


def _torch_plan(S, mu, nu, epsilon, iters, tol, gradient) -> Tensor:
    """The plan ``T`` of the cost ``1 - clamp(S)`` on the torch solver."""
    if gradient == "none_through_plan" and epsilon > 0 and _COST_RANGE / epsilon <= KERNEL_RANGE_LIMIT[_cdtype(S)]:
        # a constant plan on the plain-scaling path: the kernel straight from S
        return _plan_from_similarity(S, mu, nu, epsilon=epsilon, iters=iters, tol=tol)
    C = 1.0 - S.clamp(-1.0, 1.0)
    return sinkhorn(C, mu, nu, epsilon=epsilon, iters=iters, tol=tol, gradient=gradient, cost_range=_COST_RANGE)


def _gathered_block_scores(
    x_local: Tensor,
    x_global: Tensor,
    gallery_local: Tensor,
    gallery_global: Tensor,
    idx: Tensor,
    *,
    epsilon: float,
    iters: int,
    tol: float | None,
    marginals: MarginalKind,
    buffer: Tensor | None = None,
    per_query: bool | None = None,
    native: bool | None = None,
) -> tuple[Tensor, Tensor] | None:
    """``(cos, SS)``, each ``(c, K)``, of queries ``x (c, N, D) / (c, D)`` with the gallery items
    ``idx (c, K)``, without autograd; None when this fast path does not apply.

    For each query, its K candidates' locals and globals are gathered into one ``(K M + K, D)``
    buffer (reused: it stays in the caches) and one matrix product with ``[x_local; x_global]``
    gives S, nu's correlations, mu's correlations and the global cosines at once (with T torch
    threads, T queries at a time in one batched product). The plans
    come from :func:`glassmetric.similarity.sinkhorn._plan_from_similarity` (constant plans, the
    kernel straight from S). The same scores as :func:`structural_similarity` on the gathered
    candidates (to rounding). Applies when all four inputs share one dtype (float32 or float64)
    and ``2 / epsilon <= KERNEL_RANGE_LIMIT``. ``per_query`` (default: on the CPU only) picks
    the per-query gather; otherwise the whole chunk is gathered into one ``(c, K M + K, D)``
    buffer and multiplied in one batched product (what accelerators want). ``native`` (default:
    float32 on the CPU when :func:`glassmetric.similarity.lane_sinkhorn.available`) solves the
    plans and sums SS on the native lane kernel, the same iterations and stops to float
    rounding; False keeps the torch solver.
    """
    dt = x_local.dtype
    if (
        marginals not in ("cross_correlation", "uniform")
        or dt not in (torch.float32, torch.float64)
        or any(t.dtype != dt for t in (x_global, gallery_local, gallery_global))
        or not (epsilon > 0 and _COST_RANGE / epsilon <= KERNEL_RANGE_LIMIT[dt])
    ):
        return None
    c, k = idx.shape
    n, d = x_local.shape[-2:]
    m = gallery_local.shape[-2]
    width = k * m + k
    if per_query is None:
        per_query = x_local.device.type == "cpu"  # one cached buffer per query on the CPU
    group = _product_group(c)  # per query on the CPU, one query a thread in one batched product
    size = width * d * (group if per_query else c)
    if buffer is None or buffer.dtype != dt or buffer.numel() < size:
        buffer = torch.empty(size, dtype=dt, device=x_local.device)
    if native is None:
        native = lane_sinkhorn.applies(dt, x_local.device)
    with torch.no_grad(), _no_autocast(x_local):
        xs = torch.cat([x_local, x_global[:, None, :]], 1)  # (c, N + 1, D)
        if per_query:
            buf = buffer.view(-1)[:size].view(group, width, d)
            prod = torch.empty(c, n + 1, width, dtype=dt, device=x_local.device)
            for q0 in range(0, c, group):
                g = min(group, c - q0)
                for b, q in enumerate(range(q0, q0 + g)):
                    torch.index_select(gallery_local, 0, idx[q], out=buf[b, : k * m].view(k, m, d))
                    torch.index_select(gallery_global, 0, idx[q], out=buf[b, k * m :])
                if g == 1:
                    torch.mm(xs[q0], buf[0].t(), out=prod[q0])
                else:
                    torch.bmm(xs[q0 : q0 + g], buf[:g].transpose(1, 2), out=prod[q0 : q0 + g])
        else:  # accelerators: one gather and one batched product for the whole chunk
            buf = buffer.view(-1)[:size].view(c, width, d)
            flat = idx.reshape(-1)
            buf[:, : k * m].copy_(gallery_local.index_select(0, flat).view(c, k * m, d))
            buf[:, k * m :].copy_(gallery_global.index_select(0, flat).view(c, k, d))
            prod = torch.bmm(xs, buf.transpose(1, 2))
        cos, ss = _scores_from_products(prod, n, m, k, marginals, epsilon=epsilon, iters=iters, tol=tol, native=native)
    return cos.clone(), ss


def _scores_from_products(
    prod: Tensor,
    n: int,
    m: int,
    k: int,
    marginals: MarginalKind,
    *,
    epsilon: float,
    iters: int,
    tol: float | None,
    native: bool,
):
    """``(cos, SS)`` from the products ``prod (c, N + 1, K M + K)`` of :func:`_gathered_block_scores`.

    ``prod[q, :N, :KM]`` = S, ``prod[q, N, :KM]`` = nu's correlations (y's cells vs gx),
    ``prod[q, :N, KM:]`` = mu's correlations (x's cells vs gy), ``prod[q, N, KM:]`` = cos(gx, gy).
    """
    c = prod.shape[0]
    S = prod[:, :n, : k * m].view(c, n, k, m).permute(0, 2, 1, 3)  # (c, K, N, M), strided
    cos = prod[:, n, k * m :]
    if marginals == "cross_correlation":
        nu = _normalise_correlations(prod[:, n, : k * m].reshape(c, k, m))
        mu = _normalise_correlations(prod[:, :n, k * m :].transpose(1, 2))
    else:
        mu = torch.full((c, k, n), 1.0 / n, dtype=prod.dtype, device=prod.device)
        nu = torch.full((c, k, m), 1.0 / m, dtype=prod.dtype, device=prod.device)
    if native:  # the same plans, 16 problems per SIMD lane, never written out
        ss = lane_sinkhorn.lane_structural_similarity(S, mu, nu, epsilon=epsilon, iters=iters, tol=tol)
    else:
        T = _plan_from_similarity(S, mu, nu, epsilon=epsilon, iters=iters, tol=tol)
        ss = T.mul_(S).sum((-2, -1))
    return cos, ss


def structural_similarity(
    x_local: Tensor,
    y_local: Tensor,
    x_global: Tensor | None = None,
    y_global: Tensor | None = None,
    *,
    epsilon: float = _EPSILON,
    iters: int = _ITERS,
    tol: float | None = _TOL,
    marginals: MarginalKind = _MARGINALS,
    gradient: GradientMode = _GRADIENT,
    settings: OTSettings | None = None,
) -> Tensor:
    r"""Structural similarity :math:`SS = \sum_{ij} T_{ij} S_{ij}` of each pair.

    Args:
        x_local, y_local: L2-normalised local embeddings ``(..., N, D)`` / ``(..., M, D)``, batch
            dims left-aligned (``(Q, N, D)`` vs ``(Q, K, N, D)`` gives ``(Q, K)``).
        x_global, y_global: L2-normalised global embeddings ``(..., D)`` with the same batch dims
            as their local side; may be None with ``marginals="uniform"`` or
            ``"pooled_cross_correlation"``.
        epsilon: entropic regularisation of the OT problem (cost ``1 - S`` in [0, 2]).
        iters: the most Sinkhorn iterations.
        tol: the L1 row-marginal error at which a problem stops, checked every 5 iterations;
            None for exactly ``iters`` iterations with no host sync (see :func:`sinkhorn`).
        marginals: ``"cross_correlation"`` (DIML), ``"pooled_cross_correlation"`` (against each
            image's mean cell, for locals not in the globals' space) or ``"uniform"``.
        gradient: ``"none_through_plan"`` (the plan is a constant) or ``"unrolled"``.
        settings: all five at once, instead of the keywords.

    Returns:
        ``SS`` with the broadcast batch shape, float32 (float64 for float64 inputs).
    """
    ot = _ot_settings(settings, epsilon=epsilon, iters=iters, tol=tol, marginals=marginals, gradient=gradient)
    _check_inputs(x_local, y_local, x_global, y_global, ot.marginals)
    return _structural_similarity(
        x_local, y_local, x_global, y_global, ot.epsilon, ot.iters, ot.tol, ot.marginals, ot.gradient
    )


def _check_inputs(x_local, y_local, x_global, y_global, marginals) -> None:
    """:func:`check_normalised` on what the marginals ``marginals`` read."""
    uses_globals = marginals == "cross_correlation"
    check_normalised(
        x_local=x_local,
        y_local=y_local,
        x_global=x_global if uses_globals else None,
        y_global=y_global if uses_globals else None,
    )


def _structural_similarity(x_local, y_local, x_global, y_global, epsilon, iters, tol, marginals, gradient) -> Tensor:
    """:func:`structural_similarity` without the input check (for callers whose inputs are
    known to be normalised, e.g. re-ranking). Constant plans of float32 CPU inputs come from
    the native lane kernel (:class:`_LaneStructuralSimilarity`), any other case from the torch
    solver."""
    x_local, y_local, x_global, y_global = _align(x_local, y_local, x_global, y_global)
    S, mu, nu = _s_and_marginals(x_local, y_local, x_global, y_global, marginals, gradient)
    if gradient == "none_through_plan" and _lane_applies(S, epsilon):
        return _lane_structural_similarity(S, mu, nu, epsilon, iters, tol)
    T = _torch_plan(S, mu, nu, epsilon, iters, tol, gradient)
    return (T * S).sum((-2, -1))


def _lane_applies(S: Tensor, epsilon: float) -> bool:
    """Whether the native lane kernel solves the constant plans of ``S``: float32 on the CPU,
    the kernel built, at least one problem, and the plain-kernel range ``2 / epsilon <= 50``."""
    return (
        S.numel() > 0
        and epsilon > 0
        and _COST_RANGE / epsilon <= KERNEL_RANGE_LIMIT[torch.float32]
        and lane_sinkhorn.applies(S.dtype, S.device)
    )


def _lane_structural_similarity(S: Tensor, mu: Tensor, nu: Tensor, epsilon: float, iters: int, tol) -> Tensor:
    """``SS`` of ``S (..., n, m)`` and marginals broadcasting against it, on the lane kernel:
    the batch dims are flattened to the kernel's ``(G, K)`` (a view for a contiguous ``S``)."""
    n, m = S.shape[-2:]
    batch = torch.broadcast_shapes(S.shape[:-2], mu.shape[:-1], nu.shape[:-1])
    g, k = (math.prod(batch[:-1]), batch[-1]) if batch else (1, 1)
    S4 = S.expand(*batch, n, m).reshape(g, k, n, m)
    mu3 = mu.detach().expand(*batch, n).reshape(g, k, n)
    nu3 = nu.detach().expand(*batch, m).reshape(g, k, m)
    ss = _LaneStructuralSimilarity.apply(S4, mu3, nu3, epsilon, iters, tol)
    return ss.reshape(batch)


class _LaneStructuralSimilarity(torch.autograd.Function):
    r""":math:`SS = \sum_{ij} T_{ij} S_{ij}` with the plan ``T`` a constant (DIML eq. 5, the
    ``"none_through_plan"`` gradient): the forward pass solves the plans on the native lane
    kernel, which also writes ``T`` out when ``S`` needs a gradient; the backward pass is
    :math:`\partial SS / \partial S = T`. The marginals get no gradient (they only shape ``T``)."""

    @staticmethod
    def forward(ctx, S: Tensor, mu: Tensor, nu: Tensor, epsilon: float, iters: int, tol: float | None) -> Tensor:
        plan = torch.empty(S.shape, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        ss = lane_sinkhorn.lane_structural_similarity(S, mu, nu, epsilon=epsilon, iters=iters, tol=tol, plan_out=plan)
        if plan is not None:
            ctx.save_for_backward(plan)
        return ss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ss: Tensor):
        (plan,) = ctx.saved_tensors
        return plan * grad_ss[..., None, None], None, None, None, None, None


def global_similarity(x_global: Tensor, y_global: Tensor) -> Tensor:
    """``cos(gx, gy) = gx . gy`` (inputs normalised); batch dims left-aligned as for locals."""
    bx, by = x_global.ndim - 1, y_global.ndim - 1
    if bx < by:
        x_global = x_global.reshape(*x_global.shape[:bx], *([1] * (by - bx)), x_global.shape[-1])
    elif by < bx:
        y_global = y_global.reshape(*y_global.shape[:by], *([1] * (bx - by)), y_global.shape[-1])
    dt = _cdtype(x_global, y_global)
    with _no_autocast(x_global):
        return (x_global.to(dt) * y_global.to(dt)).sum(-1)


def multiscale_score(
    x_local: Tensor,
    y_local: Tensor,
    x_global: Tensor,
    y_global: Tensor,
    **kwargs,
) -> Tensor:
    """Multi-scale ranking score ``cos(gx, gy) + SS`` (in [-2, 2]).

    ``kwargs``: the OT settings as for :func:`structural_similarity` (epsilon, iters, tol,
    marginals, gradient, or settings). All four embeddings are checked.
    """
    ot = _ot_settings(kwargs.pop("settings", None), **kwargs)
    check_normalised(x_local=x_local, y_local=y_local, x_global=x_global, y_global=y_global)
    return global_similarity(x_global, y_global) + _structural_similarity(
        x_local, y_local, x_global, y_global, ot.epsilon, ot.iters, ot.tol, ot.marginals, ot.gradient
    )


def structural_similarity_matrix(
    x_local: Tensor,
    y_local: Tensor | None = None,
    x_global: Tensor | None = None,
    y_global: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    epsilon: float = _EPSILON,
    iters: int = _ITERS,
    tol: float | None = _TOL,
    marginals: MarginalKind = _MARGINALS,
    gradient: GradientMode = _GRADIENT,
    settings: OTSettings | None = None,
) -> Tensor:
    """``(B, B')`` matrix ``M[a, b] = SS(x_local[a], y_local[b])``; ``y`` defaults to ``x``.

    The arguments in the order of :func:`structural_similarity`: ``x_local (B, N, D)``,
    ``y_local (B', M, D)`` (None: ``x_local``, and ``y_global`` is then ``x_global``),
    ``x_global (B, D)``, ``y_global (B', D)`` (globals may be None with uniform or pooled
    marginals); the OT settings as keywords or ``settings``. Rows are processed in chunks of
    ``chunk_size`` (None: all at once); each chunk solves ``chunk * B'`` OT problems in one
    batched call. Memory per chunk: tensors of ``chunk * B' * N * M`` floats, about six alive
    at the peak (S, cost, ``-cost/eps``, the two shifted kernels, one product temporary; the
    plan reuses a buffer), i.e. roughly ``24 * chunk * B' * N * M`` bytes in float32
    (B = B' = 112, N = M = 16, one chunk: ~77 MB), plus the autograd graph of every iteration
    in the ``"unrolled"`` mode. The only Python loop is over chunks. With the default
    ``gradient`` the result is differentiable w.r.t. the local embeddings through ``S``, ready
    for pair-based losses.
    """
    ot = _ot_settings(settings, epsilon=epsilon, iters=iters, tol=tol, marginals=marginals, gradient=gradient)
    if y_local is None:
        y_local, y_global = x_local, x_global
        _check_inputs(x_local, None, x_global, None, ot.marginals)
    else:
        _check_inputs(x_local, y_local, x_global, y_global, ot.marginals)
    return _structural_similarity_matrix(x_local, y_local, x_global, y_global, ot, chunk_size)


def _structural_similarity_matrix(
    x_local, y_local, x_global, y_global, ot: OTSettings, chunk_size: int | None
) -> Tensor:
    """:func:`structural_similarity_matrix` of given sides, without the input check."""
    if x_local.ndim != 3:
        raise ValueError(f"x_local must be (B, N, D), got {tuple(x_local.shape)}")
    if y_local.ndim != 3:
        raise ValueError(f"y_local must be (B', M, D), got {tuple(y_local.shape)}")
    b = x_local.shape[0]
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    step = b if chunk_size is None else chunk_size
    yl = y_local[None]  # (1, B', M, D)
    yg = None if y_global is None else y_global[None]  # (1, B', D)
    if b == 0:
        return x_local.new_zeros((0, y_local.shape[0]), dtype=_cdtype(x_local, y_local))
    rows = []
    for start in range(0, b, max(step, 1)):
        xl = x_local[start : start + step, None]  # (c, 1, N, D)
        xg = None if x_global is None else x_global[start : start + step, None]  # (c, 1, D)
        rows.append(_structural_similarity(xl, yl, xg, yg, ot.epsilon, ot.iters, ot.tol, ot.marginals, ot.gradient))
    return torch.cat(rows, 0)


@dataclass
class StructuralExplanation:
    r"""Decomposition of one structural match (shapes for a single pair; batch dims lead otherwise).

    ``ss = sum_ij T_ij S_ij`` splits into per-cell-pair terms ``T_ij S_ij``:
    ``contribution = T * S / ss`` sums to 1 (all zeros when ``|ss| < 1e-12``; entries of the
    opposite sign to ``ss`` are cell pairs that pull it towards 0); ``region_contribution_x[i] = sum_j T_ij S_ij`` (what
    cell ``i`` of x contributes) and ``region_contribution_y[j] = sum_i T_ij S_ij`` each sum to
    ``ss``. ``score = s_global + ss`` is the multi-scale ranking score.
    """

    S: Tensor  #: (N, M) local cosine similarities
    T: Tensor  #: (N, M) transport plan (rows: x's cells, columns: y's cells)
    mu: Tensor  #: (N,) row marginal (x's cells)
    nu: Tensor  #: (M,) column marginal (y's cells)
    contribution: Tensor  #: (N, M) T * S / ss, sums to 1
    region_contribution_x: Tensor  #: (N,) row sums of T * S, sum to ss
    region_contribution_y: Tensor  #: (M,) column sums of T * S, sum to ss
    ss: Tensor  #: structural similarity
    s_global: Tensor  #: cos(gx, gy)
    score: Tensor  #: s_global + ss


def explain_pair(
    x_local: Tensor,
    y_local: Tensor,
    x_global: Tensor,
    y_global: Tensor,
    *,
    epsilon: float = _EPSILON,
    iters: int = _ITERS,
    tol: float | None = _TOL,
    marginals: MarginalKind = _MARGINALS,
    settings: OTSettings | None = None,
) -> StructuralExplanation:
    """Everything a person needs to read one match: S, T, mu, nu and the contributions.

    Inputs and OT settings as for :func:`structural_similarity` (one pair: ``(N, D), (M, D),
    (D,), (D,)``; batch dims are allowed and lead every field); the globals are always checked
    (they give ``s_global``). Computed without autograd, so a ``settings.gradient`` plays no
    part.
    """
    ot = _ot_settings(settings, epsilon=epsilon, iters=iters, tol=tol, marginals=marginals)
    check_normalised(x_local=x_local, y_local=y_local, x_global=x_global, y_global=y_global)
    with torch.no_grad():
        xl, yl, xg, yg = _align(x_local, y_local, x_global, y_global)
        S, mu, nu, T = _plan_and_s(xl, yl, xg, yg, ot.epsilon, ot.iters, ot.tol, ot.marginals, "none_through_plan")
        TS = T * S
        ss = TS.sum((-2, -1))
        mu = mu.expand(T.shape[:-1])  # uniform marginals come unexpanded
        nu = nu.expand(*T.shape[:-2], T.shape[-1])
        safe = ss.abs() >= 1e-12
        denom = torch.where(safe, ss, torch.ones_like(ss))[..., None, None]
        contribution = torch.where(safe[..., None, None], TS / denom, torch.zeros_like(TS))
        s_global = global_similarity(x_global, y_global)
        return StructuralExplanation(
            S=S,
            T=T,
            mu=mu,
            nu=nu,
            contribution=contribution,
            region_contribution_x=TS.sum(-1),
            region_contribution_y=TS.sum(-2),
            ss=ss,
            s_global=s_global,
            score=s_global + ss,
        )
