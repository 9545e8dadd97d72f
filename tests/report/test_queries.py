"""The worst, random and best queries of a report."""

import numpy as np

from glassmetric.report.queries import select_queries


def test_worst_and_best_follow_hit_then_ap_and_random_is_the_rest():
    hit = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 0], bool)
    ap = np.array([0.9, 0.1, 0.5, 0.0, 0.95, 0.3, 0.2, 0.0, 0.6, 0.95, np.nan])
    out = select_queries(hit, ap, 3, seed=0)
    assert out["worst"] == [3, 7, 1]  # misses, AP 0.0 (lower index first), then 0.1
    assert out["best"] == [4, 9, 0]
    assert len(out["random"]) == 3 and set(out["random"]) <= {2, 5, 6, 8}
    assert 10 not in [q for group in out.values() for q in group]  # a query without relevant items is never shown
    assert select_queries(hit, ap, 3, seed=0) == out


def test_small_sets_give_disjoint_groups():
    out = select_queries(np.array([True, False]), np.array([1.0, 0.0]), 4)
    shown = [q for group in out.values() for q in group]
    assert len(shown) == len(set(shown)) and out["worst"] == [1] and out["best"] == [0]
