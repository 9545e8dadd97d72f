"""Exact chunked kNN against an independent brute force (full matrix, stable numpy argsort).

Most embeddings are multiples of 1/4 in a small range, so every inner product is exact in
float32 and float64 alike: ties are real ties and the expected order is unambiguous.
"""

import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glassmetric.retrieval import knn as knn_mod
from glassmetric.retrieval.knn import default_chunk_rows, iter_knn, knn


def brute_force(query, gallery, k, exclude_self=False):
    """Top-k by inner product from the full score matrix; ties by lower gallery index."""
    s = np.asarray(query, dtype=np.float64) @ np.asarray(gallery, dtype=np.float64).T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, axis=1), idx


def quantized(rng, n, d, low=-4, high=4):
    return (rng.integers(low, high + 1, size=(n, d)) / 4).astype(np.float32)


def make_points(kind, n=90, d=8, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "random":
        return quantized(rng, n, d)
    if kind == "clustered":
        centers = rng.integers(-3, 4, size=(6, d)).astype(np.float32)
        return centers[rng.integers(0, 6, size=n)] + quantized(rng, n, d, -1, 1)
    if kind == "duplicates":
        base = quantized(rng, n // 4, d, -1, 1)
        return base[rng.integers(0, len(base), size=n)]
    raise ValueError(kind)


def as_t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def check_equal(got, expected):
    sims, idx = got
    ref_sims, ref_idx = expected
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_array_equal(sims.numpy(), ref_sims.astype(np.float32))


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("kind", ["random", "clustered", "duplicates"])
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("k", [1, 5, "all"])
def test_matches_brute_force(kind, exclude_self, k, backend):
    x = make_points(kind)
    q, g = (x, x) if exclude_self else (x[:30], x[30:])
    k = len(g) - int(exclude_self) if k == "all" else k
    got = knn(as_t(q), as_t(g), k, exclude_self=exclude_self, chunk_size=16, backend=backend)
    check_equal(got, brute_force(q, g, k, exclude_self))
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64


@pytest.mark.parametrize("exclude_self", [False, True])
def test_chunking_invariance(exclude_self):
    x = as_t(make_points("duplicates", n=80))
    results = [knn(x, x, 6, exclude_self=exclude_self, chunk_size=c) for c in (1, 7, None)]
    for sims, idx in results[1:]:
        assert torch.equal(sims, results[0][0]) and torch.equal(idx, results[0][1])


def test_default_chunk_follows_memory_budget(monkeypatch):
    n = 50
    assert default_chunk_rows(n) == knn_mod.SCORE_BUDGET_BYTES // (4 * n)
    assert default_chunk_rows(10**12) == 1
    monkeypatch.setattr(knn_mod, "SCORE_BUDGET_BYTES", 3 * 4 * n)  # three rows of scores
    x = as_t(make_points("random", n=n))
    chunks = list(iter_knn(x, x, 4, exclude_self=True))
    assert [start for start, _, _ in chunks] == list(range(0, n, 3))
    assert all(len(idx) <= 3 for _, _, idx in chunks)
    check_equal(knn(x, x, 4, exclude_self=True), brute_force(x.numpy(), x.numpy(), 4, True))


def test_exclude_self_with_duplicates_finds_the_twin():
    # distinct +-1 vectors all score d with themselves and < d with each other
    rng = np.random.default_rng(1)
    base = np.unique(rng.choice([-1.0, 1.0], size=(40, 8)), axis=0)[:20].astype(np.float32)
    x = np.concatenate([base, base])  # point i and i + 20 coincide
    sims, idx = knn(as_t(x), as_t(x), 1, exclude_self=True, chunk_size=9)
    assert idx[:, 0].tolist() == ((np.arange(40) + 20) % 40).tolist()
    assert (sims[:, 0] == 8).all()
    check_equal(knn(as_t(x), as_t(x), 5, exclude_self=True), brute_force(x, x, 5, True))


def test_all_equal_points_ordered_by_index():
    x = torch.ones(9, 4)
    _, idx = knn(x, x, 8, exclude_self=True, chunk_size=4)
    for i in range(9):
        assert idx[i].tolist() == [j for j in range(9) if j != i]
    _, idx = knn(x[:3], x, 5)
    assert idx.tolist() == [[0, 1, 2, 3, 4]] * 3


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_boundary_ties_pick_lowest_indices(backend):
    # scores of the single query against the gallery: 1 at 2, 5, 7, 8, 0.5 elsewhere
    g = torch.full((10, 1), 0.5)
    g[[2, 5, 7, 8]] = 1.0
    sims, idx = knn(torch.ones(1, 1), g, 6, backend=backend)
    assert idx.tolist() == [[2, 5, 7, 8, 0, 1]]
    assert sims.tolist() == [[1, 1, 1, 1, 0.5, 0.5]]


def test_float16_computes_in_float32():
    x = make_points("clustered", n=60)
    got = knn(as_t(x).half(), as_t(x).half(), 7, exclude_self=True)
    assert got[0].dtype == torch.float32
    check_equal(got, brute_force(x, x, 7, True))


@pytest.mark.parametrize("exclude_self", [False, True])
def test_k_larger_than_gallery(exclude_self):
    x = torch.randn(10, 3)
    k = 10 if exclude_self else 11
    with pytest.raises(ValueError, match=rf"k={k}.*gallery size 10"):
        knn(x, x, k, exclude_self=exclude_self)
    knn(x, x, k - 1, exclude_self=exclude_self)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(query=torch.randn(4, 3), gallery=torch.randn(5, 2), k=1), "dim"),
        (dict(query=torch.randn(4, 3), gallery=torch.randn(5, 3), k=0), "positive"),
        (dict(query=torch.randn(4, 3), gallery=torch.randn(5, 3), k=1, backend="x"), "backend"),
        (dict(query=torch.randn(4, 3), gallery=torch.randn(5, 3), k=1, chunk_size=0), "chunk"),
        (
            dict(query=torch.randn(4, 3), gallery=torch.randn(5, 3), k=1, exclude_self=True),
            "same set",
        ),
        (dict(query=torch.full((4, 3), float("nan")), gallery=torch.randn(5, 3), k=1), "NaN"),
    ],
)
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        knn(**kwargs)


def test_empty_query():
    sims, idx = knn(torch.zeros(0, 3), torch.randn(5, 3), 2)
    assert sims.shape == idx.shape == (0, 2)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_faiss_agrees_with_torch_without_ties(exclude_self):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q, g = (x, x) if exclude_self else (x[:100], x[100:])
    t_sims, t_idx = knn(as_t(q), as_t(g), 10, exclude_self=exclude_self)
    f_sims, f_idx = knn(as_t(q), as_t(g), 10, exclude_self=exclude_self, backend="faiss")
    assert torch.equal(t_idx, f_idx)
    torch.testing.assert_close(f_sims, t_sims, atol=1e-5, rtol=0)
    _, ref_idx = brute_force(q, g, 10, exclude_self)
    np.testing.assert_array_equal(t_idx.numpy(), ref_idx)


@pytest.mark.parametrize("chunk_size", [1, 13, None])
def test_faiss_exclude_self_with_duplicates(chunk_size):
    """Rows tied at the k-th score are searched again: the result is brute force's exactly."""
    x = make_points("duplicates", n=80)
    got = knn(as_t(x), as_t(x), 6, exclude_self=True, backend="faiss", chunk_size=chunk_size)
    assert (got[1].numpy() != np.arange(80)[:, None]).all()  # never itself, even among duplicates
    check_equal(got, brute_force(x, x, 6, True))


def test_auto_picks_faiss_for_large_cpu_searches(monkeypatch):
    """Below the size threshold, on a GPU, or without faiss: torch; else faiss. Each path
    returns brute force's neighbours, ties included."""
    n = knn_mod.AUTO_FAISS_MIN_ITEMS
    assert knn_mod.auto_backend(10, 10) == "torch"
    assert knn_mod.auto_backend(n, n) == "faiss"
    assert knn_mod.auto_backend(n, n, "cuda") == "torch"
    assert knn_mod.auto_backend(n - 1, 10**6) == knn_mod.auto_backend(10**6, n - 1) == "torch"

    x = make_points("duplicates", n=80)
    expected = brute_force(x, x, 7, True)
    ran = []
    for name in ("_iter_torch", "_iter_faiss"):
        real = getattr(knn_mod, name)
        monkeypatch.setattr(
            knn_mod, name, lambda *a, _real=real, _name=name, **kw: (ran.append(_name), _real(*a, **kw))[1]
        )
    for threshold, path in [(81, "_iter_torch"), (80, "_iter_faiss")]:
        monkeypatch.setattr(knn_mod, "AUTO_FAISS_MIN_ITEMS", threshold)
        ran.clear()
        check_equal(knn(as_t(x), as_t(x), 7, exclude_self=True, chunk_size=9), expected)
        assert ran[0] == path
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert knn_mod.auto_backend(80, 80) == "torch"
    ran.clear()
    check_equal(knn(as_t(x), as_t(x), 7, exclude_self=True), expected)
    assert ran == ["_iter_torch"]


def test_faiss_missing_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match="faiss-cpu"):
        knn(torch.randn(4, 3), torch.randn(5, 3), 1, backend="faiss")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_matches_brute_force(dtype):
    x = make_points("duplicates", n=200)
    got = knn(as_t(x).cuda().to(dtype), as_t(x).cuda().to(dtype), 9, exclude_self=True)
    assert got[0].is_cuda and got[1].is_cuda
    check_equal((got[0].cpu(), got[1].cpu()), brute_force(x, x, 9, True))


@settings(max_examples=120, deadline=None)
@given(
    data=st.data(),
    n_query=st.integers(1, 25),
    n_gallery=st.integers(1, 25),
    dim=st.integers(1, 3),
    exclude_self=st.booleans(),
    chunk_size=st.one_of(st.none(), st.integers(1, 30)),
    backend=st.sampled_from(["torch", "faiss"]),
)
def test_property_forced_ties(data, n_query, n_gallery, dim, exclude_self, chunk_size, backend):
    """Entries in {-1, 0, 1} in at most 3 dims: almost every score is tied with another."""
    if exclude_self:
        n_gallery = n_query = max(n_query, 2)
    entries = st.lists(st.integers(-1, 1), min_size=dim, max_size=dim)
    g = np.array(data.draw(st.lists(entries, min_size=n_gallery, max_size=n_gallery)), np.float32)
    q = g if exclude_self else np.array(data.draw(st.lists(entries, min_size=n_query, max_size=n_query)), np.float32)
    k = data.draw(st.integers(1, n_gallery - int(exclude_self)))
    got = knn(as_t(q), as_t(g), k, exclude_self=exclude_self, chunk_size=chunk_size, backend=backend)
    check_equal(got, brute_force(q, g, k, exclude_self))
