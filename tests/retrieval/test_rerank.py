"""Structural re-ranking against per-query brute force, and ranking_metrics / embed_fields.

The brute force ranks the gallery by the float64 cosine (stable, lower index first), takes the
top K, scores each candidate ALONE with ``multiscale_score`` on one pair, and sorts by that
score with Python's stable sort.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glassmetric.data.synthetic import SyntheticParts
from glassmetric.data.transforms import build_transforms
from glassmetric.models import build_model
from glassmetric.models.spatial_head import SpatialGridHead
from glassmetric.retrieval.embed import embed_dataset, embed_fields
from glassmetric.retrieval.knn import knn
from glassmetric.retrieval.metrics import ranking_metrics, retrieval_metrics
from glassmetric.retrieval.rerank import rerank_sweep, structural_rerank
from glassmetric.similarity.structural import multiscale_score

NON_NMI = ("recall", "r_precision", "map_at_r")
OT = {"epsilon": 0.05, "iters": 50, "tol": None}  # exactly 50 iterations on both sides


def make_data(n, n_classes, n_cells=4, dim=8, seed=0, dtype=torch.float64):
    """Clustered globals; locals = a class template per cell plus noise (so SS carries signal)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % n_classes
    centres = torch.randn(n_classes, dim, generator=g, dtype=dtype)
    glob = F.normalize(centres[labels] + 1.2 * torch.randn(n, dim, generator=g, dtype=dtype), dim=-1)
    templates = torch.randn(n_classes, n_cells, dim, generator=g, dtype=dtype)
    local = templates[labels] + 1.0 * torch.randn(n, n_cells, dim, generator=g, dtype=dtype)
    return glob, F.normalize(local, dim=-1), labels


def brute_global_order(qg, gg, exclude_self):
    s = (qg.double() @ gg.double().T).numpy()
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")
    return order[:, : gg.shape[0] - int(exclude_self)]


def brute_rerank(qg, ql, gg, gl, k, exclude_self=False, **ot):
    """(Q, A) ranking: top k re-sorted by the single-pair multiscale score, rest global."""
    order = brute_global_order(qg, gg, exclude_self)
    ranked, scores = [], []
    for q in range(len(qg)):
        cand = order[q, :k].tolist()
        s = {j: float(multiscale_score(ql[q], gl[j], qg[q], gg[j], **ot)) for j in cand}
        top = sorted(cand, key=lambda j: -s[j])  # stable: ties keep the global order
        ranked.append(top + order[q, k:].tolist())
        scores.append([s[j] for j in top])
    return torch.tensor(ranked), torch.tensor(scores, dtype=torch.float64)


# ------------------------------------------------------------------------- structural_rerank


def test_rerank_matches_brute_force():
    qg, ql, _ = make_data(9, 3, seed=1)
    gg, gl, _ = make_data(25, 3, seed=2)
    res = structural_rerank(qg, ql, gg, gl, k=7, n_neighbours=10, **OT)
    ranked, scores = brute_rerank(qg, ql, gg, gl, 7, **OT)
    assert res.k == 7 and res.indices.shape == (9, 10)
    assert torch.equal(res.indices, ranked[:, :10])
    torch.testing.assert_close(res.scores[:, :7], scores, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.global_scores[:, :7] + res.structural_scores[:, :7], res.scores[:, :7])
    assert res.structural_scores[:, 7:].isnan().all() and res.scores[:, 7:].isnan().all()
    # the re-scored block is sorted; the tail is global, sorted by cosine
    assert (res.scores[:, :7].diff(dim=1) <= 0).all()
    assert (res.global_scores[:, 7:].diff(dim=1) <= 1e-6).all()
    # the re-scored global term is the cosine of the embeddings
    torch.testing.assert_close(res.global_scores[:, :7], (qg[:, None] * gg[res.indices[:, :7]]).sum(-1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rerank_with_pooled_marginals_matches_brute_force(dtype):
    """Marginals against each image's mean cell (``pooled_cross_correlation``), on the fast path
    (float32: the native kernel where it builds) and in float64: the same ranking and scores as
    the single-pair brute force, whose global term is still the embeddings' cosine."""
    qg, ql, _ = make_data(9, 3, seed=1, dtype=dtype)
    gg, gl, _ = make_data(25, 3, seed=2, dtype=dtype)
    ot = dict(OT, marginals="pooled_cross_correlation")
    res = structural_rerank(qg, ql, gg, gl, k=7, n_neighbours=10, **ot)
    ranked, scores = brute_rerank(qg.double(), ql.double(), gg.double(), gl.double(), 7, **ot)
    assert torch.equal(res.indices, ranked[:, :10])
    torch.testing.assert_close(
        res.scores[:, :7].double(), scores, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5
    )
    torch.testing.assert_close(res.global_scores[:, :7], (qg[:, None] * gg[res.indices[:, :7]]).sum(-1))
    plain = structural_rerank(qg, ql, gg, gl, k=7, n_neighbours=10, **OT)
    assert not torch.allclose(plain.structural_scores[:, :7], res.structural_scores[:, :7])


def test_rerank_chunking_invariance():
    qg, ql, _ = make_data(11, 3, seed=3, dtype=torch.float32)
    gg, gl, _ = make_data(20, 3, seed=4, dtype=torch.float32)
    ref = structural_rerank(qg, ql, gg, gl, k=6, chunk_size=None, **OT)
    for chunk in (1, 3, 11, 50):
        res = structural_rerank(qg, ql, gg, gl, k=6, chunk_size=chunk, knn_chunk_size=4, **OT)
        assert torch.equal(res.indices, ref.indices)
        torch.testing.assert_close(res.scores, ref.scores, rtol=0, atol=1e-6)


def test_rerank_with_tolerance_is_chunking_invariant_and_converged():
    """With a tol, each OT problem stops at its own check, so no chunk composition changes a
    score; and each score is that of a plan within the tolerance."""
    qg, ql, _ = make_data(11, 3, seed=3, dtype=torch.float32)
    gg, gl, _ = make_data(20, 3, seed=4, dtype=torch.float32)
    kw = {"k": 6, "epsilon": 0.05, "iters": 2000, "tol": 1e-5}
    ref = structural_rerank(qg, ql, gg, gl, **kw)
    for chunk in (1, 3, 11):
        res = structural_rerank(qg, ql, gg, gl, chunk_size=chunk, **kw)
        assert torch.equal(res.indices, ref.indices)
        torch.testing.assert_close(res.scores, ref.scores, rtol=0, atol=1e-6)
    exact = structural_rerank(qg, ql, gg, gl, k=6, epsilon=0.05, iters=3000)
    torch.testing.assert_close(
        ref.structural_scores,
        exact.structural_scores.gather(1, (exact.indices[:, :, None] == ref.indices[:, None, :]).float().argmax(1)),
        rtol=0,
        atol=2e-5,
    )


@pytest.mark.parametrize("dtypes", [("float32", "float64"), ("float32", "float32")])
def test_rerank_general_path_matches_brute_force(dtypes):
    """Mixed query / gallery dtypes, or (float32) an epsilon too small for the plain kernel,
    take the general block path; it must give the same ranking."""
    qg, ql, _ = make_data(6, 3, seed=1, dtype=getattr(torch, dtypes[0]))
    gg, gl, _ = make_data(15, 3, seed=2, dtype=getattr(torch, dtypes[1]))
    eps = 0.05 if dtypes[0] != dtypes[1] else 0.03  # 2 / 0.03 > 50: the log-domain kernel
    ot = {"epsilon": eps, "iters": 50, "tol": None}
    res = structural_rerank(qg, ql, gg, gl, k=5, **ot)
    ranked, scores = brute_rerank(qg.double(), ql.double(), gg.double(), gl.double(), 5, **ot)
    assert torch.equal(res.indices, ranked[:, :5])
    torch.testing.assert_close(res.scores.double(), scores, rtol=0, atol=1e-5)


def test_rerank_exclude_self():
    glob, local, _ = make_data(14, 3, seed=5)
    res = structural_rerank(glob, local, k=13, **OT)  # same set: self excluded
    assert not (res.indices == torch.arange(14)[:, None]).any()
    ranked, _ = brute_rerank(glob, local, glob, local, 13, exclude_self=True, **OT)
    assert torch.equal(res.indices, ranked)
    explicit = structural_rerank(glob, local, glob, local, k=13, exclude_self=True, **OT)
    assert torch.equal(explicit.indices, res.indices)
    with pytest.raises(ValueError):
        structural_rerank(glob, local, k=14)  # only 13 others
    with pytest.raises(ValueError):
        structural_rerank(glob, local, exclude_self=False)


def test_rerank_k0_is_global_and_arguments():
    qg, ql, _ = make_data(5, 2, seed=6)
    gg, gl, _ = make_data(8, 2, seed=7)
    res = structural_rerank(qg, ql, gg, gl, k=0, n_neighbours=4)
    _, idx = knn(qg, gg, 4)
    assert res.k == 0 and torch.equal(res.indices, idx) and res.scores.isnan().all()
    assert structural_rerank(qg, ql, gg, gl, k=0).indices.shape == (5, 0)
    with pytest.raises(ValueError):
        structural_rerank(qg, ql, gg, gl, k=5, n_neighbours=3)
    with pytest.raises(ValueError):
        structural_rerank(qg, ql, gg, gl[:, :2], k=2)  # cell counts differ
    with pytest.raises(ValueError):
        structural_rerank(qg, ql, gg, None, k=2)


def test_rerank_fixes_a_wrong_global_top1():
    e = torch.eye(4, dtype=torch.float64)
    q_glob = e[0]
    wrong = F.normalize(e[0] + 0.3 * e[1], dim=0)  # cos 0.958
    right = F.normalize(e[0] + 0.5 * e[2], dim=0)  # cos 0.894
    far = F.normalize(e[0] - 2.0 * e[3], dim=0)  # cos 0.447
    q_loc = e.clone()  # four cells: e1 .. e4
    gallery_global = torch.stack([far, wrong, right])
    gallery_local = torch.stack([q_loc.flip(0), -q_loc, q_loc])  # right has the query's layout
    res = structural_rerank(q_glob[None], q_loc[None], gallery_global, gallery_local, k=3)
    _, glob_idx = knn(q_glob[None], gallery_global, 3)
    assert glob_idx[0, 0] == 1  # the global top-1 is the wrong class
    assert res.indices[0, 0] == 2  # re-ranking puts the right one first
    sweep = rerank_sweep(
        q_glob[None],
        q_loc[None],
        gallery_global,
        gallery_local,
        query_labels=torch.tensor([7]),
        gallery_labels=torch.tensor([0, 1, 7]),
        ks=(0, 1, 2, 3),
        recall_ks=(1,),
    )
    assert [sweep[k]["recall@1"] for k in (0, 1, 2, 3)] == [0.0, 0.0, 1.0, 1.0]
    assert sweep[2]["map_at_r"] == 1.0 and sweep[0]["r_precision"] == 0.0


# ------------------------------------------------------------------------------ rerank_sweep


@pytest.mark.parametrize("same_set", [True, False])
def test_sweep_k0_equals_global_metrics(same_set):
    glob, local, labels = make_data(30, 4, seed=8, dtype=torch.float32)
    if same_set:
        sweep = rerank_sweep(glob, local, query_labels=labels, ks=(0,), recall_ks=(1, 2, 4, 50))
        ref = retrieval_metrics(glob, labels, recall_ks=(1, 2, 4, 50), include=NON_NMI)
    else:
        qg, ql, ql_lab = glob[:10], local[:10], labels[:10]
        gg, gl, gl_lab = glob[10:], local[10:], labels[10:]
        sweep = rerank_sweep(
            qg, ql, gg, gl, query_labels=ql_lab, gallery_labels=gl_lab, ks=(0,), recall_ks=(1, 2, 4, 50)
        )
        ref = retrieval_metrics(qg, ql_lab, gg, gl_lab, recall_ks=(1, 2, 4, 50), include=NON_NMI)
    assert sweep[0] == ref  # exactly


def test_sweep_against_brute_force_every_k():
    glob, local, labels = make_data(18, 3, seed=9)
    ks = (0, 2, 5, 17, 1000)  # 17 = every other item; 1000 is capped to 17
    sweep = rerank_sweep(glob, local, query_labels=labels, ks=ks, recall_ks=(1, 2, 4), chunk_size=5, **OT)
    assert list(sweep) == list(ks)
    for k in ks:
        ranked, _ = brute_rerank(glob, local, glob, local, min(k, 17), exclude_self=True, **OT)
        ref = ranking_metrics(ranked, labels, labels, recall_ks=(1, 2, 4), exclude_self=True)
        assert sweep[k] == pytest.approx(ref, abs=1e-12), k
    assert sweep[17] == sweep[1000]
    # R = 5 > K = 2: positions after K keep the global order and still count
    assert sweep[0] != sweep[17]


def test_sweep_lone_queries_nan():
    glob, local, _ = make_data(4, 4, seed=10)
    sweep = rerank_sweep(glob, local, query_labels=torch.arange(4), ks=(0, 2))
    assert all(math.isnan(v) for res in sweep.values() for v in res.values())


# --------------------------------------------------------------------------- ranking_metrics


def test_ranking_metrics_by_hand_and_checks():
    # query of class 0 with R = 2 relevant gallery items (0 and 3)
    g_lab = torch.tensor([0, 1, 1, 0, 2])
    idx = torch.tensor([[1, 0, 2, 3, 4]])
    out = ranking_metrics(idx, torch.tensor([0]), g_lab, recall_ks=(1, 2))
    assert out == {"recall@1": 0.0, "recall@2": 1.0, "r_precision": 0.5, "map_at_r": 0.25}
    # relevant_counts overrides R
    out = ranking_metrics(idx, torch.tensor([0]), g_lab, recall_ks=(1,), relevant_counts=torch.tensor([1]))
    assert out["r_precision"] == 0.0 and out["map_at_r"] == 0.0
    with pytest.raises(ValueError, match="R neighbours"):
        ranking_metrics(idx[:, :1], torch.tensor([0]), g_lab, recall_ks=(1,))
    with pytest.raises(ValueError, match="recall@4"):
        ranking_metrics(idx[:, :2], torch.tensor([0]), g_lab, recall_ks=(4,))
    with pytest.raises(ValueError):
        ranking_metrics(idx + 10, torch.tensor([0]), g_lab)


def test_ranking_metrics_equals_retrieval_metrics_on_knn_ranking():
    glob, _, labels = make_data(40, 5, seed=11, dtype=torch.float32)
    _, idx = knn(glob, glob, 39, exclude_self=True)
    out = ranking_metrics(idx, labels, labels, recall_ks=(1, 8, 100), exclude_self=True)
    assert out == retrieval_metrics(glob, labels, recall_ks=(1, 8, 100), include=NON_NMI)


# ------------------------------------------------------------------------------ embed_fields


def test_embed_fields_and_sweep_end_to_end():
    torch.manual_seed(0)
    data = SyntheticParts(
        "test", num_classes=4, images_per_class=3, image_size=64, transform=build_transforms(False, 64, 64)
    )
    model = build_model("resnet18", 16)
    only = embed_fields(model, data, fields=("embedding",), batch_size=4)
    assert set(only) == {"embedding", "labels", "index"}
    assert only["index"].tolist() == list(range(len(data)))  # nothing skipped: every position
    with pytest.raises(ValueError, match="local"):  # no spatial head yet
        embed_fields(model, data, fields=("embedding", "local"), batch_size=6)
    with pytest.raises(ValueError, match="unknown"):
        embed_fields(model, data, fields=("embeddings",))
    model.add_head("spatial", SpatialGridHead.sharing(model.head, 2))
    model.train()
    fields = embed_fields(model, data, fields=("embedding", "local"), batch_size=5)
    assert model.training
    emb, labels = embed_dataset(model, data, batch_size=6)
    torch.testing.assert_close(fields["embedding"], emb)
    assert torch.equal(fields["labels"], labels)
    assert fields["local"].shape == (6, 4, 16) and fields["local"].dtype == torch.float32
    sweep = rerank_sweep(fields["embedding"], fields["local"], query_labels=labels, ks=(0, 2, 5))
    assert sweep[0] == retrieval_metrics(emb, labels, include=NON_NMI)
    assert all(0.0 <= v <= 1.0 for res in sweep.values() for v in res.values())
