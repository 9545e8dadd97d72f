"""Retrieval metrics against pytorch-metric-learning's AccuracyCalculator and plain loops.

AccuracyCalculator is given an independent brute-force kNN (full matrix, stable argsort, lower
index first on ties) so that tied neighbours come in the same order as ours; its default
faiss kNN is compared on tie-free data. Its k-means is faiss k-means with 20 iterations,
seeded like ours, so NMI is compared for equality too.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import FaissKMeans

from glassmetric.errors import DataError
from glassmetric.retrieval.metrics import (
    UnmatchedQueryWarning,
    format_metrics_table,
    recall_ks_for,
    retrieval_metrics,
)

AC_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r", "NMI")
AC_NAMES = {
    "precision_at_1": "recall@1",
    "r_precision": "r_precision",
    "mean_average_precision_at_r": "map_at_r",
    "NMI": "nmi",
}
KS = (1, 2, 4, 8, 1000)


class BruteForceKNN:
    """AccuracyCalculator ``knn_func``: exact inner-product kNN, lower index first on ties."""

    def __call__(self, query, k, reference, ref_includes_query=False):
        s = query.double().cpu().numpy() @ reference.double().cpu().numpy().T
        if ref_includes_query:  # query i is reference i
            np.fill_diagonal(s, -np.inf)
        idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return torch.from_numpy(np.take_along_axis(s, idx, 1)), torch.from_numpy(idx)


def accuracy_calculator(
    query, query_labels, gallery=None, gallery_labels=None, *, knn_func=None, kmeans_seed=0, include=AC_METRICS
):
    kmeans = FaissKMeans(niter=20) if kmeans_seed is None else FaissKMeans(niter=20, seed=kmeans_seed)
    calc = AccuracyCalculator(
        include=include,
        k=None,
        device=torch.device("cpu"),
        knn_func=knn_func,
        kmeans_func=kmeans,
    )
    same = gallery is None
    res = calc.get_accuracy(
        query,
        query_labels,
        query if same else gallery,
        query_labels if same else gallery_labels,
        ref_includes_query=same,
    )
    return {AC_NAMES[k]: v for k, v in res.items()}


def loop_metrics(query, query_labels, gallery=None, gallery_labels=None, ks=KS):
    """Recall@K, R-Precision, MAP@R by the definitions, one query at a time."""
    same = gallery is None
    if same:
        gallery, gallery_labels = query, query_labels
    s = np.asarray(query, np.float64) @ np.asarray(gallery, np.float64).T
    recall = {k: [] for k in ks}
    rps, aps = [], []
    for i in range(len(query)):
        others = [j for j in range(len(gallery)) if not (same and j == i)]
        ranked = sorted(others, key=lambda j: (-s[i, j], j))
        rel = [gallery_labels[j] == query_labels[i] for j in ranked]
        r = sum(rel)
        if r == 0:
            continue  # lone query
        for k in ks:
            recall[k].append(any(rel[:k]))
        rps.append(sum(rel[:r]) / r)
        hits, ap = 0, 0.0
        for pos in range(r):
            if rel[pos]:
                hits += 1
                ap += hits / (pos + 1)
        aps.append(ap / r)

    def mean(v):
        return float(np.mean(v)) if v else math.nan

    out = {f"recall@{k}": mean(v) for k, v in recall.items()}
    return out | {"r_precision": mean(rps), "map_at_r": mean(aps)}


def quantized(rng, n, d, low=-4, high=4):
    """Multiples of 1/4: inner products are exact in float32, so ties are real ties."""
    return (rng.integers(low, high + 1, size=(n, d)) / 4).astype(np.float32)


def make_problem(kind, n=240, d=16, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "random":
        x, y = quantized(rng, n, d), rng.integers(0, 30, size=n)
    elif kind == "clustered":
        y = rng.integers(0, 12, size=n)
        centers = rng.integers(-3, 4, size=(12, d)).astype(np.float32)
        x = centers[y] + quantized(rng, n, d, -2, 2)
        y = np.where(rng.random(n) < 0.1, rng.integers(0, 12, size=n), y)  # label noise
    elif kind == "ties":
        base = quantized(rng, n // 4, d, -1, 1)
        x, y = base[rng.integers(0, len(base), size=n)], rng.integers(0, 20, size=n)
    else:
        raise ValueError(kind)
    y[:7] = 1000 + np.arange(7)  # singleton classes
    return x, y


def split(x, y, n_query=90):
    """Query/gallery split with query classes absent from the gallery and vice versa."""
    yq, yg = y[:n_query].copy(), y[n_query:].copy()
    yq[10:14] = 2000 + np.arange(4)  # not in the gallery: lone queries
    yg[:5] = 3000 + np.arange(5)  # gallery-only classes
    return x[:n_query], yq, x[n_query:], yg


def assert_metrics_equal(got, expected, tol=1e-9):
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=tol, rel=0), key


@pytest.mark.parametrize("kind", ["random", "clustered", "ties"])
@pytest.mark.parametrize("mode", ["same_set", "query_gallery"])
@pytest.mark.parametrize("knn_backend", ["auto", "torch", "faiss"])
def test_equals_accuracy_calculator(kind, mode, knn_backend):
    x, y = make_problem(kind)
    args = (x, y) if mode == "same_set" else split(x, y)
    got = retrieval_metrics(*(torch.from_numpy(a) for a in args), recall_ks=KS, seed=0, knn_backend=knn_backend)
    expected = accuracy_calculator(*(torch.from_numpy(a) for a in args), knn_func=BruteForceKNN(), kmeans_seed=0)
    assert_metrics_equal(got, expected)
    assert_metrics_equal(got, loop_metrics(*args))
    assert list(got) == [f"recall@{k}" for k in KS] + ["nmi", "r_precision", "map_at_r"]
    assert all(type(v) is float for v in got.values())


@pytest.mark.parametrize("mode", ["same_set", "query_gallery"])
def test_equals_default_accuracy_calculator_without_ties(mode):
    """AccuracyCalculator as shipped: faiss L2 kNN on normalised data, faiss k-means seed."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 25, size=400)
    x = rng.standard_normal((25, 32))[y] * 0.4 + rng.standard_normal((400, 32))
    x = torch.nn.functional.normalize(torch.from_numpy(x).float(), dim=1)
    y = torch.from_numpy(y)
    args = (x, y) if mode == "same_set" else (x[:150], y[:150], x[150:], y[150:])
    got = retrieval_metrics(*args, seed=1234)
    assert_metrics_equal(got, accuracy_calculator(*args, kmeans_seed=None), tol=1e-6)


def test_lone_queries_are_skipped_not_missed():
    # query 0: only class-0 item in the gallery is the query itself -> lone, skipped
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [1.0, 0.1]])
    y = torch.tensor([0, 1, 1, 2])
    got = retrieval_metrics(x, y, include=("recall", "r_precision", "map_at_r"), recall_ks=(1,))
    assert got == {"recall@1": 1.0, "r_precision": 1.0, "map_at_r": 1.0}
    with pytest.warns(UnmatchedQueryWarning, match="1 of 2 queries"):
        got = retrieval_metrics(
            x[:2], y[:2], x[2:], torch.tensor([1, 5]), recall_ks=(1,), include=("recall", "r_precision")
        )
    assert got == {"recall@1": 1.0, "r_precision": 1.0}  # query 0 has R = 0


def test_all_lone_gives_nan():
    x = torch.eye(4)
    got = retrieval_metrics(x, torch.arange(4), recall_ks=(1, 2))
    assert all(math.isnan(got[k]) for k in ("recall@1", "recall@2", "r_precision", "map_at_r"))
    assert got["nmi"] == pytest.approx(1.0)


def test_chunking_and_backend_invariance():
    x, y = make_problem("ties")
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    ref = retrieval_metrics(x, y, recall_ks=KS, include=("recall", "r_precision", "map_at_r"))
    for chunk_size in (1, 7, None):
        for backend in ("torch", "faiss"):
            got = retrieval_metrics(
                x,
                y,
                recall_ks=KS,
                chunk_size=chunk_size,
                knn_backend=backend,
                include=("recall", "r_precision", "map_at_r"),
            )
            assert got == ref

    rng = np.random.default_rng(4)
    x = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((300, 24))).float())
    y = torch.from_numpy(rng.integers(0, 30, size=300))
    t = retrieval_metrics(x, y, recall_ks=KS, include=("recall", "r_precision", "map_at_r"))
    f = retrieval_metrics(x, y, recall_ks=KS, include=("recall", "r_precision", "map_at_r"), knn_backend="faiss")
    assert_metrics_equal(f, t, tol=1e-12)


def test_nmi_separated_clusters():
    """sklearn k-means (k-means++, 10 inits) recovers well separated classes exactly.

    The faiss backend runs one k-means from random initial points, as AccuracyCalculator
    does, and can merge two of them; it is compared with AccuracyCalculator instead.
    """
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(5), 20)
    x = torch.from_numpy(np.eye(8)[y] * 10 + rng.standard_normal((100, 8)) * 0.01).float()
    got = retrieval_metrics(x, torch.from_numpy(y), include=("nmi",), nmi_backend="sklearn")
    assert got == {"nmi": pytest.approx(1.0)}
    got = retrieval_metrics(x, torch.from_numpy(y), include=("nmi",), seed=7)
    assert got == pytest.approx(accuracy_calculator(x, torch.from_numpy(y), kmeans_seed=7, include=("NMI",)), abs=1e-12)


def test_bad_arguments():
    x, y = torch.randn(5, 3), torch.arange(5)
    with pytest.raises(ValueError, match="unknown metrics"):
        retrieval_metrics(x, y, include=("recall", "mAP"))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        retrieval_metrics(x, y[:4])
    with pytest.raises(ValueError, match="gallery_labels"):
        retrieval_metrics(x, y, x)
    with pytest.raises(ValueError, match="recall_ks"):
        retrieval_metrics(x, y, recall_ks=(0,))
    with pytest.raises(ValueError, match="nmi_backend"):
        retrieval_metrics(x, y, nmi_backend="cuml")


def test_format_metrics_table():
    rows = {
        "untrained": {"recall@1": 0.5123, "nmi": 0.4, "map_at_r": 0.01},
        "trained": {"recall@1": 0.736, "nmi": 0.655555, "map_at_r": float("nan"), "r_precision": 1.0},
    }
    assert format_metrics_table(rows) == (
        "run          R@1    NMI  MAP@R      RP\n"
        "untrained  51.23  40.00   1.00       -\n"
        "trained    73.60  65.56    nan  100.00"
    )


def test_recall_ks_for():
    assert recall_ks_for("sop") == recall_ks_for("SOP") == (1, 10, 100, 1000)
    assert recall_ks_for("cub") == recall_ks_for("cars") == (1, 2, 4, 8)


labels = st.lists(st.integers(0, 3), min_size=1, max_size=14)
points = st.lists(st.integers(-1, 1), min_size=2, max_size=2)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), same_set=st.booleans())
def test_property_forced_ties(data, same_set):
    """Entries in {-1, 0, 1} in 2 dims and 4 classes: ties and lone queries are common."""
    yq = np.array(data.draw(labels if not same_set else labels.filter(lambda v: len(v) > 1)))
    xq = np.array(data.draw(st.lists(points, min_size=len(yq), max_size=len(yq))), np.float32)
    if same_set:
        args = (xq, yq)
    else:
        yg = np.array(data.draw(labels))
        xg = np.array(data.draw(st.lists(points, min_size=len(yg), max_size=len(yg))), np.float32)
        args = (xq, yq, xg, yg)
    include = ("recall", "r_precision", "map_at_r")
    if not same_set and not set(yq) & set(yg):  # every metric would be NaN
        with pytest.raises(DataError, match="share no class"):
            retrieval_metrics(*(torch.from_numpy(a) for a in args), recall_ks=(1, 2, 3, 20), include=include)
        return
    got = retrieval_metrics(
        *(torch.from_numpy(a) for a in args),
        recall_ks=(1, 2, 3, 20),
        include=include,
        chunk_size=data.draw(st.integers(1, 5)),
        knn_backend=data.draw(st.sampled_from(["torch", "faiss"])),
    )
    expected = accuracy_calculator(
        *(torch.from_numpy(a) for a in args), knn_func=BruteForceKNN(), include=AC_METRICS[:3]
    )
    assert_metrics_equal(got, expected)
    assert_metrics_equal(got, loop_metrics(*args, ks=(1, 2, 3, 20)))


def test_queries_whose_class_the_gallery_lacks_are_counted_or_refused():
    """Query/gallery mode: queries of classes absent from the gallery are left out with a
    warning that counts them (the metrics are the loop's over the others); when no query class
    is in the gallery, a DataError instead of NaN metrics."""
    from glassmetric.retrieval.rerank import rerank_sweep

    rng = np.random.default_rng(0)
    q = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((30, 8))).float())
    g = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((40, 8))).float())
    q_lab, g_lab = torch.arange(30) % 6, torch.arange(40) % 4  # query classes 4 and 5: not in the gallery
    with pytest.warns(
        UnmatchedQueryWarning,
        match=r"10 of 30 queries have no gallery item of their class "
        r"\(2 of 6 query classes: labels 4, 5\).*the other 20",
    ):
        got = retrieval_metrics(q, q_lab, g, g_lab, recall_ks=(1, 4), include=("recall", "r_precision", "map_at_r"))
    qn, gn, qln, gln = q.numpy(), g.numpy(), q_lab.numpy(), g_lab.numpy()
    assert_metrics_equal(got, loop_metrics(qn, qln, gn, gln, ks=(1, 4)))
    matched = qln < 4
    assert_metrics_equal(got, loop_metrics(qn[matched], qln[matched], gn, gln, ks=(1, 4)))

    def local(x):
        return x[:, None, :].repeat(1, 4, 1)

    with pytest.warns(UnmatchedQueryWarning, match="10 of 30 queries"):
        rerank_sweep(q, local(q), g, local(g), query_labels=q_lab, gallery_labels=g_lab, ks=(0,), iters=5)
    with pytest.raises(
        DataError,
        match=r"share no class: the 30 queries are of 6 classes \(labels 0, 1, 2, 3, 4, 5\), "
        r"the 40 gallery items of 4 classes \(labels 10, 11, 12, 13\)",
    ):
        retrieval_metrics(q, q_lab, g, g_lab + 10)
    with pytest.raises(DataError, match="share no class"):
        rerank_sweep(q, local(q), g, local(g), query_labels=q_lab, gallery_labels=g_lab + 10, ks=(0,), iters=5)


def _class_folders(root, classes, per_class=2):
    from glassmetric.data.synthetic import SyntheticParts

    data = SyntheticParts("test", num_classes=8, images_per_class=4, image_size=64)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            data.load(4 * (c % 4) + j).image.save(root / name / f"{j}.png")
    return root


def test_eval_of_folders_sharing_no_class_fails_on_one_line_and_partial_overlap_warns(
    tmp_path, make_checkpoint, capsys
):
    from glassmetric.cli import main

    ckpt = make_checkpoint("data.image_size=64", "data.resize=64")
    query = _class_folders(tmp_path / "query", ["ant", "bee"])
    gallery = _class_folders(tmp_path / "gallery", ["cat", "dog", "eel"])
    run = ["eval", "--checkpoint", str(ckpt), "--device", "cpu", "--query", str(query)]
    assert main([*run, "--gallery", str(gallery)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err == (
        f"glassmetric eval: error: --query {query} and --gallery {gallery} share no class folder (classes are matched "
        "by folder name): query 2 (ant, bee), gallery 3 (cat, dog, eel)"
    )
    _class_folders(gallery / "more", ["bee"])
    (gallery / "more" / "bee").rename(gallery / "bee")
    with pytest.warns(UnmatchedQueryWarning, match="2 of 4 queries have no gallery item of their class"):
        assert main([*run, "--gallery", str(gallery), "--out", str(tmp_path / "m.json")]) == 0
