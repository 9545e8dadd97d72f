"""Batched log-domain Sinkhorn against POT (ot.sinkhorn log, ot.solve_batch, ot.emd2).

Each comparison runs both solvers to convergence on fresh random problems in float64. Both
kernels of our solver are checked: the general logsumexp one (``cost_range=None``) and the
shifted-kernel one (``cost_range`` given, costs in [0, 1]).
"""

import math
import warnings

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glassmetric.similarity.sinkhorn import marginal_error, sinkhorn
from glassmetric.similarity.structural import structural_similarity


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add spin-wait overhead (100x on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


KERNELS = [None, 1.0]  # cost_range: None = logsumexp path, 1.0 = shifted kernel (costs in [0, 1])


def problem(rng, n, m, *, zeros_a=0, zeros_b=0, batch=()):
    """Cost in [0, 1] and two probability vectors (optionally with exact zeros)."""
    C = rng.random((*batch, n, m))
    a = rng.random((*batch, n)) + 0.05
    b = rng.random((*batch, m)) + 0.05
    if zeros_a:
        a[..., rng.choice(n, zeros_a, replace=False)] = 0
    if zeros_b:
        b[..., rng.choice(m, zeros_b, replace=False)] = 0
    a /= a.sum(-1, keepdims=True)
    b /= b.sum(-1, keepdims=True)
    return C, a, b


def pot_log(C, a, b, reg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT warns on log(0) for zero-mass entries
        return ot.sinkhorn(a, b, C, reg, method="sinkhorn_log", numItermax=100_000, stopThr=1e-13)


def t64(*arrays):
    return [torch.from_numpy(np.ascontiguousarray(x)) for x in arrays]


@pytest.mark.parametrize("cost_range", KERNELS)
@pytest.mark.parametrize("n,m,eps", [(5, 5, 0.1), (7, 12, 0.05), (16, 16, 0.05), (20, 9, 0.03)])
def test_matches_pot_log_sinkhorn(n, m, eps, cost_range):
    rng = np.random.default_rng(1000 * n + m)
    C, a, b = problem(rng, n, m)
    ref = pot_log(C, a, b, eps)
    Ct, at, bt = t64(C, a, b)
    T = sinkhorn(Ct, at, bt, epsilon=eps, iters=50_000, tol=1e-13, cost_range=cost_range)
    assert T.dtype == torch.float64 and T.shape == (n, m)
    np.testing.assert_allclose(T.numpy(), ref, atol=1e-5, rtol=0)
    rows, cols = marginal_error(T, at, bt)
    assert rows.item() < 1e-10 and cols.item() < 1e-10


@pytest.mark.parametrize("cost_range", KERNELS)
def test_matches_pot_solve_batch(cost_range):
    rng = np.random.default_rng(7)
    C, a, b = problem(rng, 6, 11, batch=(5,))
    Ct, at, bt = t64(C, a, b)
    res = ot.solve_batch(
        Ct, reg=0.05, a=at, b=bt, method="log_sinkhorn", reg_type="entropy", max_iter=50_000, tol=1e-13, grad="detach"
    )
    T = sinkhorn(Ct, at, bt, epsilon=0.05, iters=50_000, tol=1e-13, cost_range=cost_range)
    np.testing.assert_allclose(T.numpy(), res.plan.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_small_epsilon_approaches_exact_ot(dtype):
    """<T_eps, C> - W(C) is in [0, eps * log(min(n, m))].

    Optimality of T_eps for <T, C> - eps H(T) against the feasible exact plan T* gives
    <T_eps, C> - <T*, C> <= eps (H(T_eps) - H(T*)), and H(T*) >= max(H(mu), H(nu)),
    H(T_eps) <= H(mu) + H(nu), so the gap is at most eps * min(H(mu), H(nu)) <= eps log min(n, m);
    it is >= 0 because T_eps is feasible (up to the marginal error, ~1e-9 here).
    """
    rng = np.random.default_rng(3)
    eps = 0.005
    for n, m in [(8, 8), (10, 6)]:
        C, a, b = problem(rng, n, m)
        exact = ot.emd2(a, b, C)
        Ct, at, bt = (x.to(dtype) for x in t64(C, a, b))
        # cost_range/eps = 200: shifted kernel in float64, logsumexp path in float32
        T = sinkhorn(Ct, at, bt, epsilon=eps, iters=200_000, tol=1e-7, cost_range=1.0)
        assert torch.isfinite(T).all()
        cost = (T.double() * Ct.double()).sum().item()
        slack = 1e-6 if dtype == torch.float64 else 1e-4
        assert exact - slack <= cost <= exact + eps * math.log(min(n, m)) + slack


@pytest.mark.parametrize("cost_range", KERNELS)
def test_zero_mass_entries_give_zero_rows_and_columns(cost_range):
    rng = np.random.default_rng(11)
    C, a, b = problem(rng, 9, 7, zeros_a=3, zeros_b=2)
    ref = pot_log(C, a, b, 0.05)
    for dtype in (torch.float64, torch.float32):
        Ct, at, bt = (x.to(dtype) for x in t64(C, a, b))
        T = sinkhorn(Ct, at, bt, epsilon=0.05, iters=20_000, tol=1e-7, cost_range=cost_range)
        assert torch.isfinite(T).all()
        assert (T[at == 0] == 0).all() and (T[:, bt == 0] == 0).all()
        np.testing.assert_allclose(T.double().numpy(), ref, atol=1e-5, rtol=0)
        rows, cols = marginal_error(T, at, bt)
        assert rows.item() < 1e-5 and cols.item() < 1e-5


@pytest.mark.parametrize("cost_range", KERNELS)
def test_all_zero_marginal_gives_zero_plan_without_nan(cost_range):
    C = torch.rand(3, 4, 5)
    mu = torch.full((3, 4), 0.25)
    nu = torch.full((3, 5), 0.2)
    mu[1] = 0
    nu[2] = 0
    T = sinkhorn(C, mu, nu, cost_range=cost_range)
    assert torch.isfinite(T).all()
    assert (T[1] == 0).all() and (T[2] == 0).all()
    torch.testing.assert_close(T[0].sum(), torch.tensor(1.0))
    # gradients in the unrolled mode stay finite too
    Cg = C.clone().requires_grad_()
    sinkhorn(Cg, mu, nu, gradient="unrolled", iters=20, cost_range=cost_range).sum().backward()
    assert torch.isfinite(Cg.grad).all()


@pytest.mark.parametrize("cost_range", KERNELS)
def test_batched_equals_per_problem(cost_range):
    rng = np.random.default_rng(5)
    C, a, b = (torch.from_numpy(x).float() for x in problem(rng, 6, 8, zeros_a=1, batch=(3, 4)))
    T = sinkhorn(C, a, b, iters=50, cost_range=cost_range)
    assert T.shape == (3, 4, 6, 8)
    for i in range(3):
        for j in range(4):
            Tij = sinkhorn(C[i, j], a[i, j], b[i, j], iters=50, cost_range=cost_range)
            torch.testing.assert_close(T[i, j], Tij, atol=1e-7, rtol=1e-5)
    # leading dims broadcast: one marginal shared by every problem
    Tb = sinkhorn(C, a[0, 0], b[0, 0], iters=50, cost_range=cost_range)
    T21 = sinkhorn(C[2, 1], a[0, 0], b[0, 0], iters=50, cost_range=cost_range)
    torch.testing.assert_close(Tb[2, 1], T21)


def test_both_kernels_agree_in_float32():
    rng = np.random.default_rng(9)
    C, a, b = (torch.from_numpy(x).float() for x in problem(rng, 16, 16, zeros_a=2, batch=(50,)))
    T1 = sinkhorn(2 * C, a, b, cost_range=2.0)
    T2 = sinkhorn(2 * C, a, b)
    torch.testing.assert_close(T1, T2, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("cost_range", KERNELS)
def test_autocast_bfloat16_close_to_float32(cost_range):
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(8, 16, 32, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(8, 16, 32, generator=g), dim=-1)
    mu = torch.full((8, 16), 1 / 16)
    T32 = sinkhorn(1 - x @ y.transpose(1, 2), mu, mu, cost_range=cost_range)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        C = 1 - x @ y.transpose(1, 2)
        assert C.dtype == torch.bfloat16
        T = sinkhorn(C, mu.bfloat16(), mu.bfloat16(), cost_range=cost_range)
    assert T.dtype == torch.float32 and torch.isfinite(T).all()
    # bf16 has ~3 significant digits: the cost differs by ~4e-3, i.e. ~0.08 in units of eps
    torch.testing.assert_close(T, T32, atol=3e-3, rtol=0.1)
    torch.testing.assert_close(T.sum((-2, -1)), torch.ones(8), atol=1e-4, rtol=0)


@pytest.mark.parametrize("cost_range", KERNELS)
def test_default_gradient_treats_plan_as_constant(cost_range):
    g = torch.Generator().manual_seed(1)
    S = (2 * torch.rand(4, 5, 6, generator=g) - 1).requires_grad_()
    mu = torch.full((5,), 0.2)
    nu = torch.full((6,), 1 / 6)
    T = sinkhorn(1 - S, mu, nu, cost_range=cost_range)
    assert not T.requires_grad
    (T * S).sum().backward()
    assert torch.equal(S.grad, T)


@pytest.mark.parametrize("cost_range", KERNELS)
def test_unrolled_gradient_is_correct_and_differs(cost_range):
    g = torch.Generator().manual_seed(2)
    S = (2 * torch.rand(2, 3, 4, generator=g, dtype=torch.float64) - 1).requires_grad_()
    mu = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
    nu = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=torch.float64, requires_grad=True)
    kw = {"epsilon": 0.1, "iters": 30, "gradient": "unrolled", "cost_range": 2.0 if cost_range else None}

    def ss(S, mu, nu):
        return (sinkhorn(1 - S, mu, nu, **kw) * S).sum((-2, -1))

    assert torch.autograd.gradcheck(ss, (S, mu, nu))
    (gS,) = torch.autograd.grad(ss(S, mu, nu).sum(), S)
    T = sinkhorn(1 - S, mu, nu, epsilon=0.1, iters=30)
    assert torch.isfinite(gS).all()
    assert (gS - T).abs().max() > 1e-3


def test_unrolled_gradient_with_zero_mass_is_finite():
    g = torch.Generator().manual_seed(3)
    S = torch.rand(3, 4, dtype=torch.float64, generator=g).requires_grad_()
    mu = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64, requires_grad=True)
    nu = torch.tensor([0.25, 0.25, 0.5, 0.0], dtype=torch.float64, requires_grad=True)
    for cost_range in KERNELS:
        T = sinkhorn(1 - S, mu, nu, iters=20, gradient="unrolled", cost_range=cost_range)
        out = (T * S).sum()
        gS, gmu, gnu = torch.autograd.grad(out, (S, mu, nu))
        assert all(torch.isfinite(t).all() for t in (gS, gmu, gnu))
        # the plan does not depend on the costs of a zero-mass row / column (not even in the
        # first iterations: dead columns start at log 0); rounding aside, these are exact zeros
        assert gS[0].abs().max() < 1e-12 and gS[:, 3].abs().max() < 1e-12


def test_fixed_iterations_never_sync(monkeypatch):
    calls = []
    orig = torch.Tensor.item

    def counting_item(self):
        calls.append(1)
        return orig(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    C, mu, nu = torch.rand(10, 5, 5), torch.full((10, 5), 0.2), torch.full((10, 5), 0.2)
    sinkhorn(C, mu, nu, iters=40)
    assert calls == []
    # with a tolerance: one .item() per chunk of check_every iterations, and no more
    sinkhorn(C, mu, nu, iters=40, tol=0.0, check_every=10)
    assert len(calls) == 3  # after iterations 10, 20, 30 (the 40th is the last anyway)


@pytest.mark.parametrize("cost_range", KERNELS)
def test_tolerance_stops_early_with_the_promised_error(cost_range):
    rng = np.random.default_rng(4)
    C, a, b = (torch.from_numpy(x) for x in problem(rng, 12, 10, batch=(6,)))
    kw = {"epsilon": 0.02, "iters": 100_000, "check_every": 5, "cost_range": cost_range}
    T = sinkhorn(C, a, b, tol=1e-6, **kw)
    rows, cols = marginal_error(T, a, b)
    assert rows.max().item() <= 1e-6 and cols.max().item() < 1e-12
    loose = sinkhorn(C, a, b, tol=1e-2, **kw)
    assert marginal_error(loose, a, b)[0].max().item() > 1e-6  # it really stopped earlier


def _varied_batch(seed=7, batch=40, n=9, m=11):
    """A float32 batch whose problems converge at very different speeds (cost spreads from 0.1
    to 1), with zero-mass rows / columns and one all-zero marginal (problem 3)."""
    rng = np.random.default_rng(seed)
    C, a, b = problem(rng, n, m, zeros_a=1, zeros_b=2, batch=(batch,))
    C = C * rng.uniform(0.1, 1.0, size=(batch, 1, 1))
    a[3] = 0
    return [torch.from_numpy(x).float() for x in (C, a, b)]


def test_per_problem_stopping_equals_solving_each_problem_alone():
    C, a, b = _varied_batch()
    kw = {"epsilon": 0.02, "iters": 5000, "tol": 1e-5, "cost_range": 1.0}
    T = sinkhorn(C, a, b, **kw)  # compact=True: each problem stops at its own check
    assert torch.isfinite(T).all()
    for i in range(len(C)):  # a batch of one stops exactly when its problem converges
        Ti = sinkhorn(C[i], a[i], b[i], compact=False, **kw)
        assert (T[i] - Ti).abs().max().item() <= 1e-6, i
    live = torch.arange(len(C)) != 3
    rows, cols = marginal_error(T, a, b)
    assert rows[live].max().item() <= 1e-5 and cols[live].max().item() <= 1e-6
    assert T[3].eq(0).all()  # the all-zero marginal gives a zero plan
    # stopping the whole batch at once meets the same tolerance, but iterates most problems
    # further, so its plans differ
    Tb = sinkhorn(C, a, b, compact=False, **kw)
    rows_b, _ = marginal_error(Tb, a, b)
    assert rows_b[live].max().item() <= 1e-5
    assert (Tb - T).abs().amax((-2, -1))[live].gt(1e-6).sum() > len(C) // 2


def test_per_problem_stopping_at_iters_and_with_fixed_iterations():
    C, a, b = _varied_batch(seed=8)
    kw = {"epsilon": 0.02, "cost_range": 1.0}
    # an unreachable tolerance: every problem runs iters iterations, as with tol=None
    fixed = sinkhorn(C, a, b, iters=23, **kw)
    capped = sinkhorn(C, a, b, iters=23, tol=0.0, check_every=4, **kw)
    assert torch.equal(capped, fixed)
    # a tolerance that about half the problems meet at the first check: those stop there,
    # the others iterate on
    first = sinkhorn(C, a, b, iters=5, **kw)
    rows, _ = marginal_error(first, a, b)
    live = torch.arange(len(C)) != 3
    tol = rows[live].median().item()
    T = sinkhorn(C, a, b, iters=5000, tol=tol, check_every=5, **kw)
    early, late = live & (rows <= 0.5 * tol), live & (rows > 2 * tol)
    assert early.sum() >= 5 and late.sum() >= 5
    assert (T[early] - first[early]).abs().max().item() <= 1e-7
    assert ((T[late] - first[late]).abs().amax((-2, -1)) > 1e-6).all()
    assert marginal_error(T, a, b)[0][live].max().item() <= tol


def test_per_problem_stopping_syncs_once_per_check(monkeypatch):
    C, a, b = _varied_batch(seed=9)
    calls = []
    orig = torch.nonzero

    def counting_nonzero(*args, **kwargs):
        calls.append(1)
        return orig(*args, **kwargs)

    monkeypatch.setattr(torch, "nonzero", counting_nonzero)
    sinkhorn(C, a, b, epsilon=0.02, iters=40, cost_range=1.0)
    assert calls == []  # no tolerance: no host sync at all
    T = sinkhorn(C, a, b, epsilon=0.02, iters=5000, tol=1e-5, check_every=5, cost_range=1.0)
    checks = len(calls)
    # one nonzero per check, plus one per compaction and one for the problems left at the end
    # (the batch here converges in well under 100 checks)
    assert 0 < checks < 100
    assert marginal_error(T, a, b)[0][torch.arange(len(C)) != 3].max().item() <= 1e-5


@pytest.mark.parametrize("tol", [None, 1e-5])
def test_plan_from_similarity_equals_the_cost_form(tol):
    """The structural fast path (kernel straight from S, any strides) solves the same problem
    with the same iterations as sinkhorn on the cost 1 - clamp(S)."""
    from glassmetric.similarity.sinkhorn import _plan_from_similarity

    g = torch.Generator().manual_seed(3)
    SX = torch.rand(6, 5, 10, 8, generator=g) * 2.2 - 1.1  # a few entries outside [-1, 1]
    S = SX[:, :, :9, :]  # a strided slice, as the fused product gives it
    mu = torch.rand(6, 5, 9, generator=g)
    nu = torch.rand(6, 1, 8, generator=g).expand(6, 5, 8)  # broadcast
    mu[0, 0, :3] = 0
    nu = nu.clone()
    nu[1, 2] = 0  # an all-zero marginal: a zero plan
    mu, nu = mu / mu.sum(-1, keepdim=True), nu / nu.sum(-1, keepdim=True).clamp_min(1e-30)
    kw = {"epsilon": 0.05, "iters": 5000, "tol": tol}
    T = _plan_from_similarity(S, mu, nu, **kw)
    ref = sinkhorn(1 - S.clamp(-1, 1), mu, nu, cost_range=2.0, **kw)
    assert T.shape == (6, 5, 9, 8) and T.is_contiguous() and torch.isfinite(T).all()
    assert (T - ref).abs().max().item() <= 1e-6
    assert T[1, 2].eq(0).all() and T[0, 0, :3].eq(0).all()
    if tol is not None:
        live = torch.ones(6, 5, dtype=torch.bool)
        live[1, 2] = False
        assert marginal_error(T, mu, nu)[0][live].max().item() <= tol


def test_constant_plan_paths_never_read_back_without_tol(monkeypatch):
    """tol=None: the structural constant-plan path (the kernel from S) and the re-ranking fast
    path call nothing that reads a value back to the host (.item(), bool(), nonzero); the public
    structural_similarity reads back once, for its input check."""
    from glassmetric.similarity.sinkhorn import _plan_from_similarity
    from glassmetric.similarity.structural import _gathered_block_scores

    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.normalize(torch.randn(3, 9, 8, generator=g), dim=-1)
    gx = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    idx = torch.randint(0, 3, (2, 3), generator=g)
    mu = torch.full((3, 9), 1 / 9)
    mu[0] = 0  # an all-zero marginal: handled without asking whether there is one
    calls = []
    for name in ("item", "__bool__", "tolist"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name: calls.append(_n) or _o(self, *a))
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: calls.append("nonzero"))
    _plan_from_similarity(x @ x.transpose(1, 2), mu, mu, epsilon=0.05, iters=20, tol=None)
    _gathered_block_scores(
        x[:2], gx[:2], x, gx, idx, epsilon=0.05, iters=20, tol=None, marginals="cross_correlation", per_query=False
    )
    assert calls == []
    structural_similarity(x[:, None], x[None], gx[:, None], gx[None], iters=20, tol=None)
    assert calls == ["tolist"]  # the one read-back of the input check


def test_bad_arguments():
    C, mu = torch.rand(3, 3), torch.full((3,), 1 / 3)
    with pytest.raises(ValueError):
        sinkhorn(C, mu, mu, epsilon=0)
    with pytest.raises(ValueError):
        sinkhorn(C, mu, torch.full((4,), 0.25))
    with pytest.raises(ValueError):
        sinkhorn(C, mu, mu, iters=0)
    with pytest.raises(ValueError):
        sinkhorn(C, mu, mu, gradient="autodiff")


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 9),
    m=st.integers(1, 9),
    zeros=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
    cost_range=st.sampled_from(KERNELS),
)
def test_property_marginals_and_finiteness(n, m, zeros, seed, cost_range):
    rng = np.random.default_rng(seed)
    C, a, b = problem(rng, n, m, zeros_a=min(zeros, n - 1), zeros_b=min(zeros, m - 1))
    Ct, at, bt = t64(C, a, b)
    T = sinkhorn(Ct, at, bt, epsilon=0.1, iters=5000, tol=1e-10, cost_range=cost_range)
    assert torch.isfinite(T).all() and (T >= 0).all()
    rows, cols = marginal_error(T, at, bt)
    assert rows.item() <= 1e-10 and cols.item() <= 1e-10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fixed_iterations_never_synchronise():
    """tol=None: the whole solve (and structural similarity past its input check) queues kernels
    without a host sync."""
    from glassmetric.similarity.structural import _structural_similarity

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(2, 8, 16, 32, generator=g), dim=-1)
    gx = torch.nn.functional.normalize(torch.randn(2, 8, 32, generator=g), dim=-1)
    C = 1 - x[0] @ x[1].transpose(1, 2)
    mu = torch.full((8, 16), 1 / 16)
    mu[:, :3] = 0
    mu = mu / mu.sum(-1, keepdim=True)

    def run(x, gx, C, mu):
        return [
            sinkhorn(C, mu, mu, cost_range=2.0),
            sinkhorn(C, mu, mu),
            _structural_similarity(
                x[0],
                x[1],
                gx[0],
                gx[1],
                epsilon=0.05,
                iters=100,
                tol=None,
                marginals="cross_correlation",
                gradient="none_through_plan",
            ),
        ]

    cpu = run(x, gx, C, mu)
    xc, gxc, Cc, muc = x.cuda(), gx.cuda(), C.cuda(), mu.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = run(xc, gxc, Cc, muc)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=1e-5, rtol=1e-4)
