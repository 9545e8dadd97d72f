"""Confidence scores against brute force, the AUROC against a count of pairs and sklearn, and the
risk-coverage curve against every order of the tied queries."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from glassmetric.retrieval.confidence import (
    compare_confidences,
    confidence_scores,
    failure_auroc,
    kept_recall,
    kept_recall_area,
)


def brute_force_scores(x, labels, u, k):
    """Every score from the full cosine matrix, one query at a time."""
    sims = (x.double() @ x.double().T).numpy()
    out = {name: [] for name in ("top1_cosine", "margin", "knn_density", "uncertainty", "pair", "pair_sum")}
    hits = []
    for q in range(len(x)):
        others = [j for j in range(len(x)) if j != q]
        ranked = sorted(others, key=lambda j: (-sims[q, j], j))
        n = ranked[0]
        hits.append(bool(labels[n] == labels[q]))
        out["top1_cosine"].append(sims[q, n])
        out["margin"].append(sims[q, n] - sims[q, ranked[1]])
        out["knn_density"].append(np.mean([sims[q, j] for j in ranked[:k]]))
        uq, un = u[q].double().numpy(), u[n].double().numpy()
        out["uncertainty"].append(-math.sqrt(float(uq @ uq)))
        out["pair"].append(-float(((uq - un) ** 2).sum()))
        out["pair_sum"].append(-(math.sqrt(float(uq @ uq)) + math.sqrt(float(un @ un))))
    return out, np.array(hits)


def test_scores_and_hits_equal_brute_force():
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(30, 6, generator=gen), dim=1)
    labels = torch.randint(0, 4, (30,), generator=gen)
    u = torch.randn(30, 5, generator=gen)
    scores, hit = confidence_scores(x, labels, uncertainty=u, k=4)
    expected, expected_hit = brute_force_scores(x, labels, u, 4)
    np.testing.assert_array_equal(hit, expected_hit)
    for name, ref in (
        ("top1_cosine", "top1_cosine"),
        ("margin", "margin"),
        ("knn_density", "knn_density"),
        ("uncertainty", "uncertainty"),
        ("pair_uncertainty", "pair"),
        ("pair_uncertainty_sum", "pair_sum"),
    ):
        np.testing.assert_allclose(scores[name], expected[ref], atol=1e-6, err_msg=name)


def test_scores_without_uncertainty_and_with_a_gallery():
    gen = torch.Generator().manual_seed(1)
    q, g = F.normalize(torch.randn(5, 4, generator=gen), dim=1), F.normalize(torch.randn(9, 4, generator=gen), dim=1)
    ql, gl = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    scores, hit = confidence_scores(q, ql, g, gl, k=3)
    assert set(scores) == {"top1_cosine", "margin", "knn_density"}
    sims = q @ g.T
    top = sims.sort(dim=1, descending=True).values
    np.testing.assert_allclose(scores["top1_cosine"], top[:, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(scores["knn_density"], top[:, :3].mean(1).numpy(), atol=1e-6)
    np.testing.assert_array_equal(hit, (gl[sims.argmax(1)] == ql).numpy())


def test_failure_auroc_counts_pairs_and_equals_sklearn():
    conf = np.array([0.9, 0.2, 0.5, 0.5, 0.1, 0.7, 0.5])
    hit = np.array([True, False, True, False, False, True, True])
    # Mann-Whitney: a (miss, hit) pair is ordered right when the miss is less confident; ties count half
    pairs = [(m, h) for m in conf[~hit] for h in conf[hit]]
    expected = np.mean([1.0 if m < h else 0.5 if m == h else 0.0 for m, h in pairs])
    assert failure_auroc(conf, hit) == pytest.approx(expected)
    assert failure_auroc(conf, hit) == pytest.approx(roc_auc_score(~hit, -conf))
    assert math.isnan(failure_auroc(conf, np.ones(7, dtype=bool)))


def test_kept_recall_by_hand_with_ties():
    # sorted: 0.9 hit | 0.5 hit, 0.5 miss, 0.5 miss (a tie group, hit rate 1/3) | 0.1 miss
    conf = np.array([0.5, 0.9, 0.1, 0.5, 0.5])
    hit = np.array([True, True, False, False, False])
    expected = [1.0, (1 + 1 / 3) / 2, (1 + 2 / 3) / 3, (1 + 1) / 4, 2 / 5]
    np.testing.assert_allclose(kept_recall(conf, hit), expected)
    assert kept_recall_area(conf, hit) == pytest.approx(np.mean(expected))


def test_kept_recall_is_the_mean_over_every_order_of_the_ties():
    rng = np.random.default_rng(3)
    conf = rng.integers(0, 3, size=7).astype(float)
    hit = rng.random(7) < 0.5
    curves = []
    for perm in itertools.permutations(range(7)):
        order = sorted(perm, key=lambda i: -conf[i])  # sorted() is stable: ties keep the permutation's order
        kept = hit[order].astype(float)
        curves.append(np.cumsum(kept) / np.arange(1, 8))
    np.testing.assert_allclose(kept_recall(conf, hit), np.mean(curves, axis=0))


def test_compare_confidences_rows():
    hit = np.array([True, True, False, True, False, False])
    perfect = hit.astype(float) + 0.1 * np.arange(6)
    table = compare_confidences({"perfect": perfect, "inverse": -perfect}, hit)
    assert table["perfect"]["auroc"] == 1.0 and table["inverse"]["auroc"] == 0.0
    assert table["perfect"]["area"] == pytest.approx(table["oracle"]["area"])
    assert table["all"]["area"] == pytest.approx(0.5) and table["all"]["recall@1_at_0.5"] == pytest.approx(0.5)
    assert table["perfect"]["recall@1_at_0.5"] == 1.0
    # 80% of 6 queries: the 5 most confident, 3 hits
    assert table["perfect"]["recall@1_at_0.8"] == pytest.approx(3 / 5)
