"""Structural similarity (DIML) against brute-force references: explicit loops over pairs, the
marginal formulas written out, and POT's log-domain Sinkhorn for each pair."""

import math
import warnings

import numpy as np
import ot
import pytest
import torch

from glassmetric.similarity import (
    OTSettings,
    compute_marginals,
    cross_correlation_marginals,
    explain_pair,
    multiscale_score,
    sinkhorn,
    structural_similarity,
    structural_similarity_matrix,
    uniform_marginals,
)

CONVERGED = {"iters": 20_000, "tol": 1e-12}  # run our solver to convergence (float64)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add spin-wait overhead (100x on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def nrm(t):
    return torch.nn.functional.normalize(t, dim=-1)


def images(gen, *batch, n=9, d=6, dtype=torch.float64, spread=1.0):
    """Local (..., n, d) and global (..., d) embeddings, normalised. Cells share a per-image
    component (so most correlations with a related global are positive) plus noise; with a small
    d some correlations are negative, so the relu zeros some marginal entries."""
    base = torch.randn(*batch, 1, d, generator=gen, dtype=dtype)
    local = nrm(base + spread * torch.randn(*batch, n, d, generator=gen, dtype=dtype))
    glob = nrm(base[..., 0, :] + 0.5 * torch.randn(*batch, d, generator=gen, dtype=dtype))
    return local, glob


# --------------------------------------------------------------------------- brute force


def ref_marginal(cells, other_global):
    """mu_i = relu(<x_i, g_other>) / sum_k relu(<x_k, g_other>), uniform if the sum < 1e-8."""
    w = np.array([max(0.0, float(np.dot(c, other_global))) for c in cells])
    return w / w.sum() if w.sum() >= 1e-8 else np.full(len(cells), 1.0 / len(cells))


def ref_pooled(cells):
    """normalise(mean_i x_i), the image's own reference for pooled cross-correlation."""
    m = np.mean(np.asarray(cells, dtype=np.float64), axis=0)
    return m / np.linalg.norm(m)


def ref_pair(x, y, gx, gy, eps=0.05, marginals="cross_correlation"):
    """(SS, T, S, mu, nu) of one pair with POT."""
    x, y, gx, gy = (np.asarray(t, dtype=np.float64) for t in (x, y, gx, gy))
    S = np.array([[float(np.dot(xi, yj)) for yj in y] for xi in x])
    if marginals == "uniform":
        mu, nu = np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y))
    elif marginals == "pooled_cross_correlation":  # the globals are not used
        mu, nu = ref_marginal(x, ref_pooled(y)), ref_marginal(y, ref_pooled(x))
    else:
        mu, nu = ref_marginal(x, gy), ref_marginal(y, gx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # log(0) warnings for zero-mass entries
        T = ot.sinkhorn(mu, nu, 1 - S, eps, method="sinkhorn_log", numItermax=100_000, stopThr=1e-13)
    return float((T * S).sum()), T, S, mu, nu


# --------------------------------------------------------------------------- marginals


def test_marginals_match_the_formula_and_fall_back_to_uniform():
    gen = torch.Generator().manual_seed(0)
    x, gx = images(gen, 5, d=4, spread=2.0)
    y, gy = images(gen, 5, d=4, spread=2.0)
    mu = cross_correlation_marginals(x, gy)
    for b in range(5):
        ref = ref_marginal(x[b].numpy(), gy[b].numpy())
        np.testing.assert_allclose(mu[b].numpy(), ref, atol=1e-12)
    assert (mu == 0).any()  # the relu does zero some cells here
    # all correlations negative (cells in the positive orthant, global in the negative one):
    # the mass is 0, the marginal is uniform, no NaN
    pos = nrm(torch.rand(6, 4, generator=gen, dtype=torch.float64))
    mu_neg = cross_correlation_marginals(pos, -nrm(torch.ones(4, dtype=torch.float64)))
    assert torch.equal(mu_neg, torch.full((6,), 1 / 6, dtype=torch.float64))
    # per pair: only the dead pair falls back
    batch = torch.stack([pos, pos])
    ones = nrm(torch.ones(4, dtype=torch.float64))
    glob = torch.stack([ones, -ones])
    mu2 = cross_correlation_marginals(batch, glob)
    ref = ref_marginal(pos.numpy(), glob[0].numpy())
    np.testing.assert_allclose(mu2[0].numpy(), ref, atol=1e-12)
    assert torch.equal(mu2[1], torch.full((6,), 1 / 6, dtype=torch.float64))
    # uniform option; compute_marginals keeps mu on x's side and nu on y's side
    assert torch.equal(uniform_marginals(x), torch.full((5, 9), 1 / 9, dtype=torch.float64))
    mu_u, nu_u = compute_marginals(x, y[:, :4], kind="uniform")
    mu_c, nu_c = compute_marginals(x, y, gx, gy)
    assert torch.equal(mu_c, mu) and torch.equal(nu_c, cross_correlation_marginals(y, gx))
    assert mu_u.shape == (5, 9) and nu_u.shape == (5, 4)


def test_marginal_orientation():
    """mu (rows of T) comes from x's cells against gy; nu (columns) from y's cells against gx.

    x = (e0, e1), gy = e0  ->  mu = (1, 0): row 1 of T must be empty.
    y = (e0, (e0+e2)/sqrt2), gx = (e0+e2)/sqrt2  ->  nu = (1/sqrt2, 1) / (1/sqrt2 + 1).
    The plan is then forced: T = [[nu0, nu1], [0, 0]], SS = nu0 + nu1/sqrt2 = 0.828...
    With the marginals transposed (the original code's bug) T = [[nu0, 0], [nu1, 0]] and
    SS = nu0 = 0.414..., so only the right orientation passes.
    """
    e = torch.eye(3, dtype=torch.float64)
    r2 = math.sqrt(2)
    x = torch.stack([e[0], e[1]])
    y = torch.stack([e[0], (e[0] + e[2]) / r2])
    gx, gy = (e[0] + e[2]) / r2, e[0]
    nu0, nu1 = (1 / r2) / (1 / r2 + 1), 1 / (1 / r2 + 1)
    exp = explain_pair(x, y, gx, gy, **CONVERGED)
    torch.testing.assert_close(exp.mu, torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(exp.nu, torch.tensor([nu0, nu1], dtype=torch.float64))
    expected_T = torch.tensor([[nu0, nu1], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(exp.T, expected_T, atol=1e-9, rtol=0)
    ss = structural_similarity(x, y, gx, gy, **CONVERGED)
    assert abs(ss.item() - (nu0 + nu1 / r2)) < 1e-9
    assert abs(ss.item() - nu0) > 0.3  # the transposed value
    assert abs(ss.item() - ref_pair(x, y, gx, gy)[0]) < 1e-9


def test_all_negative_correlations_fall_back_to_uniform_in_ss():
    gen = torch.Generator().manual_seed(1)
    x = nrm(torch.rand(9, 8, generator=gen, dtype=torch.float64))  # positive orthant
    y = nrm(torch.rand(9, 8, generator=gen, dtype=torch.float64))
    gx = gy = -nrm(torch.ones(8, dtype=torch.float64))  # negative correlation with every cell
    exp = explain_pair(x, y, gx, gy)
    assert torch.equal(exp.mu, torch.full((9,), 1 / 9, dtype=torch.float64))
    assert torch.equal(exp.nu, torch.full((9,), 1 / 9, dtype=torch.float64))
    for t in (exp.T, exp.ss, exp.score, exp.contribution):
        assert torch.isfinite(t).all()
    ss = structural_similarity(x, y, gx, gy, **CONVERGED)
    ss_uniform = structural_similarity(x, y, marginals="uniform", **CONVERGED)
    torch.testing.assert_close(ss, ss_uniform)
    assert abs(ss.item() - ref_pair(x, y, gx, gy)[0]) < 1e-8


# --------------------------------------------------------------------------- SS vs brute force


@pytest.mark.parametrize("marginals", ["cross_correlation", "pooled_cross_correlation", "uniform"])
def test_batch_of_pairs_matches_brute_force(marginals):
    gen = torch.Generator().manual_seed(2)
    x, gx = images(gen, 6, n=9, d=5, spread=1.5)
    y, gy = images(gen, 6, n=9, d=5, spread=1.5)
    ss = structural_similarity(x, y, gx, gy, marginals=marginals, **CONVERGED)
    assert ss.shape == (6,) and ss.dtype == torch.float64
    for b in range(6):
        ref, T, _, mu, nu = ref_pair(x[b], y[b], gx[b], gy[b], marginals=marginals)
        assert abs(ss[b].item() - ref) < 1e-8
        exp = explain_pair(x[b], y[b], gx[b], gy[b], marginals=marginals, **CONVERGED)
        np.testing.assert_allclose(exp.T.numpy(), T, atol=1e-8)
        np.testing.assert_allclose(exp.mu.numpy(), mu, atol=1e-12)
        np.testing.assert_allclose(exp.nu.numpy(), nu, atol=1e-12)


def test_non_square_grids_and_default_settings():
    """x with 9 cells vs y with 4 cells; float32 and the default 100 iterations are close to the
    converged float64 reference."""
    gen = torch.Generator().manual_seed(3)
    x, gx = images(gen, 4, n=9, d=8)
    y, gy = images(gen, 4, n=4, d=8)
    ss = structural_similarity(x.float(), y.float(), gx.float(), gy.float())
    assert ss.dtype == torch.float32 and ss.shape == (4,)
    for b in range(4):
        assert abs(ss[b].item() - ref_pair(x[b], y[b], gx[b], gy[b])[0]) < 1e-4


def test_single_pair_block_and_one_vs_many_shapes():
    gen = torch.Generator().manual_seed(4)
    q, gq = images(gen, 3, n=4, d=6, dtype=torch.float32)  # Q = 3 queries
    c, gc = images(gen, 3, 5, n=4, d=6, dtype=torch.float32)  # K = 5 candidates per query
    block = structural_similarity(q, c, gq, gc)
    assert block.shape == (3, 5)
    for i in range(3):
        for k in range(5):
            one = structural_similarity(q[i], c[i, k], gq[i], gc[i, k])
            assert one.shape == ()
            torch.testing.assert_close(block[i, k], one, atol=1e-6, rtol=0)
    # one query against many candidates, both ways round
    many = structural_similarity(q[1], c[1], gq[1], gc[1])
    assert many.shape == (5,)
    torch.testing.assert_close(many, block[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(
        structural_similarity(c[1], q[1], gc[1], gq[1], iters=2000, tol=1e-6),
        structural_similarity(q[1], c[1], gq[1], gc[1], iters=2000, tol=1e-6),
        atol=1e-5,
        rtol=0,
    )
    ms = multiscale_score(q, c, gq, gc)
    torch.testing.assert_close(ms, (gq[:, None] * gc).sum(-1) + block)


@pytest.mark.parametrize("marginals", ["cross_correlation", "uniform"])
def test_matrix_equals_per_pair_and_is_chunk_invariant(marginals):
    gen = torch.Generator().manual_seed(5)
    local, glob = images(gen, 7, n=4, d=6, dtype=torch.float32)
    M = structural_similarity_matrix(local, x_global=glob, marginals=marginals)
    assert M.shape == (7, 7)
    for a in range(7):
        for b in range(7):
            ab = structural_similarity(local[a], local[b], glob[a], glob[b], marginals=marginals)
            torch.testing.assert_close(M[a, b], ab, atol=1e-6, rtol=0)
    for chunk in (1, 3, 100):
        Mc = structural_similarity_matrix(local, None, glob, chunk_size=chunk, marginals=marginals)
        torch.testing.assert_close(Mc, M, atol=1e-6, rtol=0)
    # against another set (B x B')
    other, oglob = images(gen, 4, n=4, d=6, dtype=torch.float32)
    R = structural_similarity_matrix(local, other, glob, oglob, chunk_size=2, marginals=marginals)
    assert R.shape == (7, 4)
    r52 = structural_similarity(local[5], other[2], glob[5], oglob[2], marginals=marginals)
    torch.testing.assert_close(R[5, 2], r52, atol=1e-6, rtol=0)


@pytest.mark.parametrize("marginals", ["cross_correlation", "uniform"])
def test_matrix_symmetry(marginals):
    """SS(x, y) = SS(y, x) for both kinds of marginals: swapping the images transposes S and swaps
    mu and nu (cross-correlation: mu(y, x) = f(y, gx) = nu(x, y)), so the OT problem is the
    transposed one and has the transposed solution. This holds exactly at convergence; a fixed
    number of iterations is not symmetric bit for bit (rows are updated before columns)."""
    gen = torch.Generator().manual_seed(6)
    local, glob = images(gen, 8, n=9, d=6, spread=1.5)
    M = structural_similarity_matrix(local, x_global=glob, marginals=marginals, iters=5000, tol=1e-12)
    torch.testing.assert_close(M, M.T, atol=1e-10, rtol=0)
    M100 = structural_similarity_matrix(local.float(), x_global=glob.float(), marginals=marginals)
    torch.testing.assert_close(M100, M100.T, atol=1e-3, rtol=0)


def test_ss_range():
    gen = torch.Generator().manual_seed(7)
    x, gx = images(gen, 20, n=4, d=3, spread=3.0)
    y, gy = images(gen, 20, n=4, d=3, spread=3.0)
    for a, b, ga, gb in [(x, y, gx, gy), (x, x, gx, gx), (x, -x, gx, -gx)]:
        ss = structural_similarity(a.float(), b.float(), ga.float(), gb.float())
        assert ((ss >= -1 - 1e-6) & (ss <= 1 + 1e-6)).all()
    # opposite images: S = -1 wherever cells are exact opposites; one cell repeated -> SS = -1
    one = nrm(torch.ones(4, 3, dtype=torch.float64))
    assert abs(structural_similarity(one, -one, marginals="uniform").item() + 1) < 1e-12
    assert abs(structural_similarity(one, one, marginals="uniform").item() - 1) < 1e-12


def test_decomposition_sums():
    gen = torch.Generator().manual_seed(8)
    x, gx = images(gen, n=16, d=8, dtype=torch.float32)
    y, gy = images(gen, n=16, d=8, dtype=torch.float32)
    e = explain_pair(x, y, gx, gy)
    assert e.S.shape == e.T.shape == e.contribution.shape == (16, 16)
    assert e.mu.shape == e.nu.shape == (16,)
    assert e.region_contribution_x.shape == e.region_contribution_y.shape == (16,)
    torch.testing.assert_close(e.ss, structural_similarity(x, y, gx, gy))
    torch.testing.assert_close(e.region_contribution_x.sum(), e.ss)
    torch.testing.assert_close(e.region_contribution_y.sum(), e.ss)
    torch.testing.assert_close(e.contribution.sum(), torch.tensor(1.0))
    torch.testing.assert_close(e.T.sum(), torch.tensor(1.0))
    # after the default 100 iterations the row sums carry the remaining error; columns are exact
    torch.testing.assert_close(e.T.sum(1), e.mu, atol=1e-4, rtol=0)
    torch.testing.assert_close(e.T.sum(0), e.nu, atol=1e-6, rtol=0)
    torch.testing.assert_close(e.s_global, gx @ gy)
    torch.testing.assert_close(e.score, e.s_global + e.ss)
    torch.testing.assert_close(e.score, multiscale_score(x, y, gx, gy))


def test_gradients_default_and_unrolled():
    gen = torch.Generator().manual_seed(9)
    x, gx = images(gen, 3, n=4, d=6, dtype=torch.float32)
    y, gy = images(gen, 3, n=4, d=6, dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, y, gx, gy)]
    xl, yl, xg, yg = leaves
    structural_similarity(xl, yl, xg, yg, tol=None).sum().backward()  # exactly 100 iterations
    # default: T constant -> dSS/dx_i = sum_j T_ij y_j; the globals only feed the marginals,
    # which only feed T, so they receive nothing
    mu, nu = cross_correlation_marginals(x, gy), cross_correlation_marginals(y, gx)
    T = sinkhorn(1 - x @ y.transpose(1, 2), mu, nu)
    torch.testing.assert_close(xl.grad, T @ y)
    torch.testing.assert_close(yl.grad, T.transpose(1, 2) @ x)
    assert xg.grad is None and yg.grad is None
    # multiscale score: globals get exactly the cosine term's gradient
    for t in leaves:
        t.grad = None
    multiscale_score(xl, yl, xg, yg).sum().backward()
    torch.testing.assert_close(xg.grad, gy)
    torch.testing.assert_close(yg.grad, gx)
    # unrolled: gradients also reach the globals through the marginals, and differ for locals
    for t in leaves:
        t.grad = None
    structural_similarity(xl, yl, xg, yg, tol=None, gradient="unrolled").sum().backward()
    assert xg.grad is not None and xg.grad.abs().max() > 1e-4 and torch.isfinite(xg.grad).all()
    assert (xl.grad - T @ y).abs().max() > 1e-4
    # the structural matrix is differentiable w.r.t. the local embeddings (for pair losses)
    loc = x.clone().requires_grad_()
    structural_similarity_matrix(loc, x_global=gx, chunk_size=2).sum().backward()
    assert torch.isfinite(loc.grad).all() and loc.grad.abs().max() > 0


def test_autocast_bfloat16():
    gen = torch.Generator().manual_seed(10)
    x, gx = images(gen, 5, n=16, d=32, dtype=torch.float32)
    y, gy = images(gen, 5, n=16, d=32, dtype=torch.float32)
    ref = structural_similarity(x, y, gx, gy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ss = structural_similarity(x.bfloat16(), y.bfloat16(), gx.bfloat16(), gy.bfloat16())
        M = structural_similarity_matrix(x.bfloat16(), x_global=gx.bfloat16())
    assert ss.dtype == torch.float32 and torch.isfinite(ss).all() and torch.isfinite(M).all()
    torch.testing.assert_close(ss, ref, atol=2e-2, rtol=0)  # bf16 rounding of the inputs


def test_bad_inputs():
    x = nrm(torch.randn(4, 8))
    with pytest.raises(ValueError):
        structural_similarity(x, nrm(torch.randn(4, 7)), marginals="uniform")
    with pytest.raises(ValueError):
        structural_similarity(x, x)  # cross-correlation marginals need the globals
    with pytest.raises(ValueError):
        structural_similarity(x, x, marginals="learned")


def test_explain_pair_on_a_block_and_empty_matrix():
    gen = torch.Generator().manual_seed(11)
    q, gq = images(gen, 2, n=4, d=6, dtype=torch.float32)
    c, gc = images(gen, 2, 3, n=4, d=6, dtype=torch.float32)
    for kind in ("cross_correlation", "uniform"):
        e = explain_pair(q, c, gq, gc, marginals=kind)
        assert e.T.shape == e.S.shape == (2, 3, 4, 4)
        assert e.mu.shape == e.nu.shape == e.region_contribution_x.shape == (2, 3, 4)
        torch.testing.assert_close(e.ss, structural_similarity(q, c, gq, gc, marginals=kind))
        torch.testing.assert_close(e.contribution.sum((-2, -1)), torch.ones(2, 3))
    empty = structural_similarity_matrix(q[:0], c[0], gq[:0], gc[0])
    assert empty.shape == (0, 3)


# --------------------------------------------------------------------------- gathered blocks


@pytest.mark.parametrize("marginals", ["cross_correlation", "uniform"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, None), (torch.float32, 1e-5)])
def test_gathered_block_scores_equal_the_block_call(marginals, dtype, tol):
    """The re-ranking fast path (per-query gather + one product for S, both marginals and the
    cosines) gives the scores of structural_similarity on the gathered candidates."""
    from glassmetric.similarity.structural import _gathered_block_scores, global_similarity

    g = torch.Generator().manual_seed(11)
    ql, qg = images(g, 4, n=9, d=6, dtype=dtype)
    gl, gg = images(g, 30, n=9, d=6, dtype=dtype)
    idx = torch.randint(0, 30, (4, 7), generator=g)
    kw = {"epsilon": 0.05, "iters": 300, "tol": tol, "marginals": marginals}
    cos, ss = _gathered_block_scores(ql, qg, gl, gg, idx, **kw)
    ref = structural_similarity(ql, gl[idx], qg, gg[idx], **kw)
    assert cos.shape == ss.shape == (4, 7) and cos.dtype == ss.dtype == dtype
    atol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(ss, ref, rtol=0, atol=atol)
    torch.testing.assert_close(cos, global_similarity(qg, gg[idx]), rtol=0, atol=atol)
    # a reused buffer (larger than needed) gives the same scores
    buf = torch.empty(100, 6, dtype=dtype)
    _, ss2 = _gathered_block_scores(ql, qg, gl, gg, idx, buffer=buf, **kw)
    torch.testing.assert_close(ss2, ss, rtol=0, atol=0)
    # the whole-chunk gather and batched product (the accelerator path) agree
    cos3, ss3 = _gathered_block_scores(ql, qg, gl, gg, idx, per_query=False, **kw)
    torch.testing.assert_close(ss3, ss, rtol=0, atol=atol)
    torch.testing.assert_close(cos3, cos, rtol=0, atol=atol)
    # not applicable: mixed dtypes, or an epsilon too small for the plain kernel
    assert _gathered_block_scores(ql, qg.to(torch.float16), gl, gg, idx, **kw) is None
    assert _gathered_block_scores(ql, qg, gl, gg, idx, **{**kw, "epsilon": 0.001}) is None


def test_pooled_marginals_ignore_the_globals_and_weigh_against_the_other_images_mean_cell():
    """``pooled_cross_correlation``: mu weighs x's cells against normalise(mean of y's cells), nu
    y's against x's (brute force per cell); the globals play no part (None works, and other
    globals change nothing), and the multi-scale score still adds cos(gx, gy)."""
    gen = torch.Generator().manual_seed(11)
    x, gx = images(gen, 4, n=9, d=5, spread=1.5)
    y, gy = images(gen, 4, n=7, d=5, spread=1.5)
    mu, nu = compute_marginals(x, y, None, None, "pooled_cross_correlation")
    for b in range(4):
        np.testing.assert_allclose(mu[b].numpy(), ref_marginal(x[b].numpy(), ref_pooled(y[b].numpy())), atol=1e-12)
        np.testing.assert_allclose(nu[b].numpy(), ref_marginal(y[b].numpy(), ref_pooled(x[b].numpy())), atol=1e-12)
    kw = dict(marginals="pooled_cross_correlation", **CONVERGED)
    ss = structural_similarity(x, y, gx, gy, **kw)
    torch.testing.assert_close(structural_similarity(x, y, None, None, **kw), ss, rtol=0, atol=1e-12)
    torch.testing.assert_close(structural_similarity(x, y, -gx, gy.flip(0), **kw), ss, rtol=0, atol=1e-12)
    torch.testing.assert_close(multiscale_score(x, y, gx, gy, **kw), (gx * gy).sum(-1) + ss, rtol=0, atol=1e-12)
    mat = structural_similarity_matrix(x, y, None, None, **kw)
    torch.testing.assert_close(mat.diagonal(), ss, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="'pooled_cross_correlation'"):
        compute_marginals(x, y, gx, gy, "pooled")


# --------------------------------------------------------------------------- settings and checks


def test_settings_object_equals_the_keywords_and_defaults_are_the_settings_defaults():
    import inspect

    gen = torch.Generator().manual_seed(12)
    x, gx = images(gen, 3, n=4, d=6, dtype=torch.float32)
    y, gy = images(gen, 3, n=4, d=6, dtype=torch.float32)
    ot = OTSettings(epsilon=0.1, iters=7, tol=None, marginals="uniform", gradient="unrolled")
    kw = {"epsilon": 0.1, "iters": 7, "tol": None, "marginals": "uniform", "gradient": "unrolled"}
    torch.testing.assert_close(
        structural_similarity(x, y, gx, gy, settings=ot), structural_similarity(x, y, gx, gy, **kw), rtol=0, atol=0
    )
    torch.testing.assert_close(
        structural_similarity_matrix(x, y, gx, gy, settings=ot),
        structural_similarity_matrix(x, y, gx, gy, **kw),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        multiscale_score(x, y, gx, gy, settings=ot), multiscale_score(x, y, gx, gy, **kw), rtol=0, atol=0
    )
    kw.pop("gradient")
    torch.testing.assert_close(
        explain_pair(x, y, gx, gy, settings=ot).T, explain_pair(x, y, gx, gy, **kw).T, rtol=0, atol=0
    )
    # leaving every keyword out is OTSettings(): tol 1e-4 and the rest
    torch.testing.assert_close(
        structural_similarity(x, y, gx, gy), structural_similarity(x, y, gx, gy, settings=OTSettings()), rtol=0, atol=0
    )
    for f in (structural_similarity, structural_similarity_matrix, explain_pair):
        params = inspect.signature(f).parameters
        for name in ("epsilon", "iters", "tol", "marginals"):
            assert repr(params[name].default) == repr(getattr(OTSettings(), name)), (f.__name__, name)
        with pytest.raises(ValueError, match="not both"):
            f(x, y, gx, gy, settings=ot, iters=7)


def _unnormalised(gen, scale=2**0.5):
    x, gx = images(gen, 2, n=4, d=6, dtype=torch.float32)
    return x, gx, scale * x, scale * gx


@pytest.mark.parametrize("which", ["x_local", "y_local", "x_global", "y_global"])
def test_unnormalised_inputs_are_named_with_their_worst_norm(which):
    gen = torch.Generator().manual_seed(13)
    x, gx = images(gen, 2, n=4, d=6, dtype=torch.float32)
    y, gy = images(gen, 2, n=4, d=6, dtype=torch.float32)
    args = {"x_local": x, "y_local": y, "x_global": gx, "y_global": gy}
    bad = args[which].clone()
    bad[1] *= 1.2
    bad[0] *= 2**0.5  # the worst row: norm 1.41421
    args[which] = bad
    match = f"{which} must be L2-normalised.*norm 1.41421"
    calls = [
        lambda: structural_similarity(**args),
        lambda: multiscale_score(**args),
        lambda: explain_pair(**args),
        lambda: compute_marginals(args["x_local"], args["y_local"], args["x_global"], args["y_global"]),
        lambda: structural_similarity_matrix(**args),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()
    if which.endswith("global"):  # uniform marginals read no global: nothing to check there
        structural_similarity(**args, marginals="uniform")


def test_normalisation_tolerance_follows_the_dtype_and_zero_rows_pass():
    gen = torch.Generator().manual_seed(14)
    x, gx = images(gen, 3, n=4, d=64, dtype=torch.float32)
    y, gy = images(gen, 3, n=4, d=64, dtype=torch.float32)
    # bf16 / fp16 rounding of unit vectors passes (with cross-correlation marginals)
    for dt in (torch.bfloat16, torch.float16):
        ss = structural_similarity(x.to(dt), y.to(dt), gx.to(dt), gy.to(dt))
        assert torch.isfinite(ss).all()
    # a norm of 1.002: too far for float32 (tolerance 1e-3), rounding for bfloat16 (2e-2)
    off = x * 1.002
    with pytest.raises(ValueError, match=r"x_local.*float32.*norm 1\.002"):
        structural_similarity(off, y, gx, gy)
    structural_similarity(off.bfloat16(), y.bfloat16(), gx.bfloat16(), gy.bfloat16())
    # an all-zero cell (normalize() of a zero vector) is accepted; SS stays within [-1, 1]
    z = x.clone()
    z[0, 1] = 0
    ss = structural_similarity(z, y, gx, gy)
    assert ((ss >= -1) & (ss <= 1)).all()
    # NaN is never normalised
    n = x.clone()
    n[2, 3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x_local.*norm nan"):
        structural_similarity(n, y, gx, gy)
