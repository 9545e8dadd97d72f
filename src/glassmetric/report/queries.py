"""Which queries a report shows: the worst, a random sample and the best."""

from __future__ import annotations

import numpy as np

__all__ = ["select_queries"]


def select_queries(hit_at_1: np.ndarray, ap_at_r: np.ndarray, per_group: int, seed: int = 0) -> dict[str, list[int]]:
    """``{"worst": [...], "random": [...], "best": [...]}``, disjoint, ``per_group`` each at most.

    Queries are ordered by (R@1 hit, AP@R): the worst are R@1 failures with the lowest AP@R,
    the best R@1 hits with the highest, ties broken by the lower index; the random sample is
    drawn (``seed``) from the queries left. Queries without relevant items (AP@R NaN) are left out.
    """
    if per_group < 0:
        raise ValueError(f"per_group must be >= 0, got {per_group}")
    hit = np.asarray(hit_at_1, dtype=bool)
    ap = np.asarray(ap_at_r, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(ap))
    order = valid[np.lexsort((valid, ap[valid], hit[valid]))]  # ascending: worst first, index last key
    n = min(per_group, len(order) // 3) if len(order) >= 3 else min(per_group, 1 if len(order) else 0)
    worst = order[:n].tolist()
    best_order = valid[np.lexsort((valid, -ap[valid], ~hit[valid]))]  # best first, lower index first on ties
    best = [int(i) for i in best_order if i not in set(worst)][:n]
    rest = np.setdiff1d(valid, worst + best)
    rng = np.random.default_rng(seed)
    random = sorted(int(i) for i in rng.choice(rest, size=min(n, len(rest)), replace=False))
    return {"worst": [int(i) for i in worst], "random": random, "best": best}
