"""The native lane kernel against POT and against the torch constant-plan solver.

References: POT's log-domain ``ot.sinkhorn`` in float64 (the plan's SS), and the torch solver
(``_plan_from_similarity``) run problem by problem for exactly the number of iterations at
which the kernel says each problem stopped (a brute-force replay of the stopping rule).
"""

import os

import numpy as np
import ot
import pytest
import torch

from glassmetric.similarity import lane_sinkhorn
from glassmetric.similarity.sinkhorn import _plan_from_similarity, marginal_error

EPS = 0.05


def _native_or_skip():
    if not lane_sinkhorn.available():
        if os.environ.get("GLASSMETRIC_REQUIRE_NATIVE") == "1":
            pytest.fail(f"native lane kernel required but unavailable: {lane_sinkhorn._state}")
        pytest.skip("no C compiler: the native lane kernel is unavailable")


@pytest.fixture(autouse=True)
def _native():
    _native_or_skip()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def problems(seed, g, k, n, m, zeros=False):
    """Similarities in [-1, 1] (as a strided view, like re-ranking's product) and marginals."""
    gen = torch.Generator().manual_seed(seed)
    big = torch.rand(g, n + 1, k * m + 3, generator=gen) * 2 - 1
    S = big[:, :n, : k * m].view(g, n, k, m).permute(0, 2, 1, 3)  # (g, k, n, m), strided
    mu = torch.rand(g, k, n, generator=gen) + 0.05
    nu = torch.rand(g, k, m, generator=gen) + 0.05
    if zeros:
        mu[..., 0] = 0
        nu[..., -1] = 0
    return S, mu / mu.sum(-1, keepdim=True), nu / nu.sum(-1, keepdim=True)


def torch_ss(S, mu, nu, iters, tol=None):
    T = _plan_from_similarity(S, mu, nu, epsilon=EPS, iters=iters, tol=tol)
    return T.mul_(S).sum((-2, -1))


@pytest.mark.parametrize("n,m", [(16, 16), (9, 16), (49, 49), (1, 5)])
def test_matches_pot_log_sinkhorn(n, m):
    S, mu, nu = problems(0, 1, 3, n, m)
    ss = lane_sinkhorn.lane_structural_similarity(S, mu, nu, epsilon=EPS, iters=5000, tol=1e-6)
    for g in range(1):
        for k in range(3):
            s = S[g, k].double().numpy()
            a, b = (w[g, k].double().numpy() for w in (mu, nu))  # exactly equal masses
            T = ot.sinkhorn(
                a / a.sum(), b / b.sum(), 1 - s, EPS, method="sinkhorn_log", numItermax=20000, stopThr=1e-10
            )
            assert abs(float((T * s).sum()) - float(ss[g, k])) < 2e-5


@pytest.mark.parametrize("g,k,n,m", [(2, 21, 16, 16), (1, 1, 16, 16), (3, 7, 9, 25), (1, 17, 49, 49), (2, 33, 4, 4)])
def test_stops_where_the_torch_solver_run_for_that_long_gives_the_same_score(g, k, n, m):
    """Per problem: SS equals the torch solver run for exactly the reported iterations; the
    row error there is <= tol (or the cap was reached) and, one check earlier, it was not."""
    tol, every, cap = 1e-4, 5, 400
    S, mu, nu = problems(1, g, k, n, m)
    ss, its = lane_sinkhorn.lane_structural_similarity(
        S, mu, nu, epsilon=EPS, iters=cap, tol=tol, check_every=every, return_iterations=True
    )
    assert ss.shape == its.shape == (g, k)
    assert bool((its % every == 0).all()) and int(its.min()) >= every
    for q in range(g):
        for j in range(k):
            it = int(its[q, j])
            one = (S[q, j][None], mu[q, j][None], nu[q, j][None])
            torch.testing.assert_close(ss[q, j], torch_ss(*one, it)[0], rtol=0, atol=2e-6)
            T = _plan_from_similarity(*one, epsilon=EPS, iters=it, tol=None)
            assert it == cap or float(marginal_error(T, *one[1:])[0]) <= tol * 1.05
            if it > every:
                T = _plan_from_similarity(*one, epsilon=EPS, iters=it - every, tol=None)
                assert float(marginal_error(T, *one[1:])[0]) > tol * 0.95


@pytest.mark.parametrize("iters", [1, 3, 20])
def test_fixed_iterations_equal_the_torch_solver(iters):
    S, mu, nu = problems(2, 3, 20, 16, 16, zeros=True)
    ss, its = lane_sinkhorn.lane_structural_similarity(
        S, mu, nu, epsilon=EPS, iters=iters, tol=None, return_iterations=True
    )
    assert bool((its == iters).all())
    torch.testing.assert_close(ss, torch_ss(S, mu, nu, iters), rtol=1e-5, atol=1e-6)
    # a tol never reached stops at iters, with the same scores
    ss2, its2 = lane_sinkhorn.lane_structural_similarity(
        S, mu, nu, epsilon=EPS, iters=iters, tol=0.0, return_iterations=True
    )
    assert bool((its2 == iters).all())
    torch.testing.assert_close(ss2, ss, rtol=0, atol=0)


def test_zero_mass_entries_and_empty_marginals():
    S, mu, nu = problems(3, 2, 18, 16, 16, zeros=True)
    mu[0, 3] = 0  # a problem with no row mass: SS = 0, as the torch solver's zero plan
    nu[1, 17] = 0
    ss = lane_sinkhorn.lane_structural_similarity(S, mu, nu, epsilon=EPS, iters=200, tol=1e-5)
    assert bool(torch.isfinite(ss).all())
    assert float(ss[0, 3]) == 0.0 and float(ss[1, 17]) == 0.0
    torch.testing.assert_close(ss, torch_ss(S, mu, nu, 200, 1e-5), rtol=0, atol=1e-5)


def test_strides_threads_and_chunks_do_not_change_a_score():
    S, mu, nu = problems(4, 3, 37, 16, 16)
    kw = {"epsilon": EPS, "iters": 300, "tol": 1e-4}
    ss = lane_sinkhorn.lane_structural_similarity(S, mu, nu, **kw)
    contiguous = lane_sinkhorn.lane_structural_similarity(
        S.contiguous(), mu.transpose(0, 1).contiguous().transpose(0, 1), nu.contiguous(), **kw
    )
    torch.testing.assert_close(contiguous, ss, rtol=0, atol=0)
    per_query = torch.cat(
        [lane_sinkhorn.lane_structural_similarity(S[g : g + 1], mu[g : g + 1], nu[g : g + 1], **kw) for g in range(3)]
    )
    torch.testing.assert_close(per_query, ss, rtol=0, atol=0)
    torch.set_num_threads(2)
    torch.testing.assert_close(lane_sinkhorn.lane_structural_similarity(S, mu, nu, **kw), ss, rtol=0, atol=0)


def test_bad_arguments():
    S, mu, nu = problems(5, 1, 3, 4, 4)
    f = lane_sinkhorn.lane_structural_similarity
    with pytest.raises(ValueError, match="expected S"):
        f(S[0], mu[0], nu[0], epsilon=EPS, iters=5, tol=None)
    with pytest.raises(ValueError, match="expected S"):
        f(S, mu[..., :3], nu, epsilon=EPS, iters=5, tol=None)
    with pytest.raises(ValueError, match="float32 CPU"):
        f(S.double(), mu.double(), nu.double(), epsilon=EPS, iters=5, tol=None)
    with pytest.raises(ValueError, match="iters"):
        f(S, mu, nu, epsilon=EPS, iters=0, tol=None)
    with pytest.raises(ValueError, match="epsilon"):
        f(S, mu, nu, epsilon=0.01, iters=5, tol=None)


def test_unavailable_without_a_compiler_and_callers_fall_back(monkeypatch, tmp_path):
    """No compiler (a failing CC, an empty cache): available() is False with the reason, and
    re-ranking's fast path gives the torch solver's scores."""
    from glassmetric.similarity.structural import _gathered_block_scores

    monkeypatch.setenv("GLASSMETRIC_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setattr(lane_sinkhorn, "_state", {})
    assert not lane_sinkhorn.available()
    assert "failed" in lane_sinkhorn._state["error"]
    assert not any(tmp_path.rglob("*.so"))  # nothing half-written is left behind
    with pytest.raises(RuntimeError, match="unavailable"):
        problems_ = problems(6, 1, 3, 4, 4)
        lane_sinkhorn.lane_structural_similarity(*problems_, epsilon=EPS, iters=5, tol=None)

    gen = torch.Generator().manual_seed(6)
    gl = torch.nn.functional.normalize(torch.randn(30, 16, 8, generator=gen), dim=-1)
    gg = torch.nn.functional.normalize(torch.randn(30, 8, generator=gen), dim=-1)
    idx = torch.randint(0, 30, (4, 20), generator=gen)
    kw = {"epsilon": EPS, "iters": 200, "tol": 1e-5, "marginals": "cross_correlation"}
    _, fallback = _gathered_block_scores(gl[:4], gg[:4], gl, gg, idx, **kw)
    monkeypatch.setattr(lane_sinkhorn, "_state", {})
    monkeypatch.delenv("CC")
    monkeypatch.setenv("GLASSMETRIC_NATIVE", "0")
    assert not lane_sinkhorn.available()  # switched off
    monkeypatch.setattr(lane_sinkhorn, "_state", {})
    monkeypatch.delenv("GLASSMETRIC_NATIVE")
    monkeypatch.delenv("GLASSMETRIC_CACHE")
    _, native = _gathered_block_scores(gl[:4], gg[:4], gl, gg, idx, **kw, native=True)
    torch.testing.assert_close(native, fallback, rtol=0, atol=1e-5)


def test_build_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("GLASSMETRIC_CACHE", str(tmp_path))
    monkeypatch.setattr(lane_sinkhorn, "_state", {})
    path = lane_sinkhorn.library_path()
    assert path.parent == tmp_path / "native" and not path.exists()
    assert lane_sinkhorn.available() and path.exists()
    stamp = path.stat().st_mtime_ns
    monkeypatch.setattr(lane_sinkhorn, "_state", {})
    assert lane_sinkhorn.available() and path.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    monkeypatch.setenv("CC", "/opt/other/cc")
    assert lane_sinkhorn.library_path() != path  # another compiler, another build


def test_the_build_gets_the_umasks_mode(monkeypatch, tmp_path):
    """The library is compiled into a ``mkstemp`` file (0600); it ends with the mode a compiler's
    own output gets under the umask (0777 & ~umask for an executable), like every other file."""
    monkeypatch.setenv("GLASSMETRIC_CACHE", str(tmp_path))
    monkeypatch.setattr(lane_sinkhorn, "_state", {})
    old = os.umask(0o022)
    try:
        assert lane_sinkhorn.available()
    finally:
        os.umask(old)
    assert oct(lane_sinkhorn.library_path().stat().st_mode & 0o777) == oct(0o755)


def test_pads_odd_shortlists_with_problems_that_never_leak():
    """K = 17: one full block and one with a single live lane; the padding lanes' results are
    never written over a neighbour's."""
    S, mu, nu = problems(7, 2, 17, 16, 16)
    ss = lane_sinkhorn.lane_structural_similarity(S, mu, nu, epsilon=EPS, iters=300, tol=1e-4)
    for j in (0, 15, 16):
        alone = lane_sinkhorn.lane_structural_similarity(
            S[:, j : j + 1], mu[:, j : j + 1], nu[:, j : j + 1], epsilon=EPS, iters=300, tol=1e-4
        )
        torch.testing.assert_close(alone[:, 0], ss[:, j], rtol=0, atol=0)
    assert np.isfinite(ss.numpy()).all()


@pytest.mark.parametrize("g,k,n,m,tol", [(2, 19, 16, 16, 1e-4), (1, 5, 9, 25, None), (3, 16, 7, 5, 1e-2)])
def test_plans_written_out_are_the_torch_solvers(g, k, n, m, tol):
    """``plan_out`` gets the constant plans of the torch solver (the same stops per problem),
    padded lanes write nothing past the live problems, and a problem without mass gets zeros."""
    S, mu, nu = problems(9, g, k, n, m, zeros=True)
    mu[0, 2] = 0
    size = g * k * n * m
    flat = torch.full((size + 2 * n * m,), float("nan"))  # room past the end: must stay untouched
    plan = flat[:size].view(g, k, n, m)
    ss = lane_sinkhorn.lane_structural_similarity(S, mu, nu, epsilon=EPS, iters=300, tol=tol, plan_out=plan)
    assert bool(flat[size:].isnan().all())
    expected = _plan_from_similarity(S, mu, nu, epsilon=EPS, iters=300, tol=tol)
    torch.testing.assert_close(plan, expected, rtol=1e-4, atol=1e-7)
    assert float(plan[0, 2].abs().max()) == 0.0
    torch.testing.assert_close((plan * S).sum((-2, -1)), ss, rtol=1e-5, atol=1e-6)


def test_plan_out_must_be_a_contiguous_float32_buffer_of_the_problems_shape():
    S, mu, nu = problems(10, 2, 3, 4, 4)
    for bad in (
        torch.empty(2, 3, 4, 5),
        torch.empty(2, 3, 4, 4, dtype=torch.float64),
        torch.empty(2, 3, 4, 8)[..., ::2],
    ):
        with pytest.raises(ValueError, match="plan_out"):
            lane_sinkhorn.lane_structural_similarity(S, mu, nu, epsilon=EPS, iters=5, tol=None, plan_out=bad)


def _kernel_works():
    """The kernel gives the torch solver's scores (a library that loads but computes nothing
    right would not)."""
    S, mu, nu = problems(8, 1, 5, 9, 9)
    ss = lane_sinkhorn.lane_structural_similarity(S, mu, nu, epsilon=EPS, iters=20, tol=None)
    torch.testing.assert_close(ss, torch_ss(S, mu, nu, 20), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("damage", ["empty", "cut", "garbage"])
def test_a_damaged_cached_library_is_rebuilt(monkeypatch, tmp_path, damage):
    """A 0-byte file (a full disk, a cache folder copied in part), a copy
    cut short, or bytes that are no library: removed and rebuilt, and the kernel is used."""
    monkeypatch.setenv("GLASSMETRIC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lane_sinkhorn, "_state", {})
    path = lane_sinkhorn.library_path()
    path.parent.mkdir(parents=True)
    if damage == "cut":  # a whole build elsewhere (never loaded here), half of it copied
        whole = tmp_path / "whole" / "lane.so"
        lane_sinkhorn._build(whole)
        path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    else:
        path.write_bytes(b"" if damage == "empty" else b"not a shared library\n" * 200)
    assert lane_sinkhorn.available(), lane_sinkhorn._state.get("error")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x7fELF"
    _kernel_works()
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_stale_build_temporaries_are_removed(monkeypatch, tmp_path):
    """A build killed (-9) between the compile and the rename leaves its temporary: the next
    load removes those whose writer on this host is dead or that are older than 10 minutes, and
    keeps the fresh ones of live writers (a build under way here or on another host)."""
    import socket
    import subprocess
    import time

    monkeypatch.setenv("GLASSMETRIC_CACHE", str(tmp_path))
    monkeypatch.setattr(lane_sinkhorn, "_state", {})
    folder = lane_sinkhorn.library_path().parent
    folder.mkdir(parents=True)
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = {
        f"tmp-{host}-{dead.pid}-k1ll3d.so": False,  # its writer is gone
        "tmpz8x_1q2w.so": False,  # no writer in its name, an hour old
        f"tmp-elsewhere-{os.getpid()}-old9.so": False,  # another host's, an hour old
        f"tmp-{host}-{os.getpid()}-live0.so": True,  # a live writer's, fresh
        f"tmp-elsewhere-{dead.pid}-runs.so": True,  # another host's, fresh: its pid means nothing here
    }
    hour_ago = time.time() - 3600
    for name in names:
        (folder / name).write_bytes(b"\x7fELF partial")
        if name.startswith("tmpz") or "old9" in name:
            os.utime(folder / name, (hour_ago, hour_ago))
    assert lane_sinkhorn.available()
    left = {p.name for p in folder.iterdir()}
    assert left == {lane_sinkhorn.library_path().name} | {n for n, keep in names.items() if keep}
