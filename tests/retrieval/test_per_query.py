"""Per-query R@1 and AP@R: their means are the aggregate metrics, and AP@R by its definition."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glassmetric.retrieval.knn import knn
from glassmetric.retrieval.metrics import ranking_metrics
from glassmetric.retrieval.per_query import per_query_metrics


@pytest.mark.parametrize("same_set", [True, False])
def test_means_are_the_aggregate_metrics(same_set):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    q_lab = torch.randint(0, 5, (40,), generator=g)
    ref, ref_lab = (
        (q, q_lab)
        if same_set
        else (F.normalize(torch.randn(30, 8, generator=g), dim=1), torch.randint(0, 5, (30,), generator=g))
    )
    _, idx = knn(q, ref, len(ref) - int(same_set), exclude_self=same_set)
    pq = per_query_metrics(idx, q_lab, ref_lab, exclude_self=same_set)
    agg = ranking_metrics(idx, q_lab, ref_lab, recall_ks=(1,), exclude_self=same_set)
    valid = pq.relevant > 0
    assert pq.hit_at_1[valid].mean() == pytest.approx(agg["recall@1"])
    assert np.nanmean(pq.ap_at_r) == pytest.approx(agg["map_at_r"])


def test_ap_at_r_by_hand():
    # one query of class 0, R = 3 relevant items; ranking: rel, not, rel, rel, not
    labels = torch.tensor([0, 1, 0, 0, 1])
    pq = per_query_metrics(torch.tensor([[0, 1, 2, 3, 4]]), torch.tensor([0]), labels)
    assert pq.relevant.tolist() == [3]
    assert pq.ap_at_r[0] == pytest.approx((1 / 1 + 2 / 3) / 3)
    assert pq.hit_at_1.tolist() == [True]
    lone = per_query_metrics(torch.tensor([[1, 4]]), torch.tensor([7]), labels)
    assert np.isnan(lone.ap_at_r[0]) and lone.hit_at_1.tolist() == [False]


def test_too_short_a_ranking_is_refused():
    with pytest.raises(ValueError, match="R neighbours"):
        per_query_metrics(torch.tensor([[0]]), torch.tensor([0]), torch.tensor([0, 0, 0]))


def test_relevant_counts_count_each_querys_class_in_the_gallery():
    from glassmetric.retrieval.per_query import relevant_counts

    gallery = torch.tensor([3, 1, 3, 3, 7, 1])
    queries = torch.tensor([3, 1, 7, 5, 0, 9])
    expected = [(gallery == q).sum().item() for q in queries]
    assert relevant_counts(queries, gallery).tolist() == expected == [3, 2, 1, 0, 0, 0]
    assert relevant_counts(queries, torch.tensor([], dtype=torch.long)).tolist() == [0] * 6
