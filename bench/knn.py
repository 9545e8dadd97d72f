"""Benchmark: glassmetric's ``retrieval_metrics`` against pytorch-metric-learning's
``AccuracyCalculator`` on the same embeddings, the same metrics, in the same run.

Metrics: precision@1 (= Recall@1), R-Precision, MAP@R and NMI, same-set (each item is a query
against all the others). AccuracyCalculator runs as its users run it for these metrics:
``k="max_bin_count"``, its default faiss kNN and its default faiss k-means (20 iterations,
faiss' seed 1234); glassmetric runs with its defaults and ``seed=1234`` (the same k-means).

Data: clustered embeddings, a mixture of Gaussians: N / ``--class-size`` random unit centres,
one class each, every vector a random centre plus isotropic noise of norm ``--noise``,
L2-normalised. Each configuration runs ``--repeat`` times, ours and theirs alternating; the
best time of each is kept. The parts ("ranking": kNN + Recall@1 / R-Precision / MAP@R;
"nmi": k-means + NMI) are timed once more, each side alone.

    python bench/knn.py [--sizes 10000,60000] [--dim 128] [--class-size 50] [--threads 2]
                        [--knn-backend auto|torch|faiss] [--repeat 3] [--no-parts]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time

import numpy as np
import torch

from glassmetric.retrieval.knn import auto_backend
from glassmetric.retrieval.metrics import retrieval_metrics

AC_NAMES = {
    "precision_at_1": "recall@1",
    "r_precision": "r_precision",
    "mean_average_precision_at_r": "map_at_r",
    "NMI": "nmi",
}
RANKING = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def clustered(n: int, dim: int, class_size: int, noise: float, seed: int = 0):
    """``n`` unit vectors around ``n // class_size`` random unit centres, and their class labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // class_size), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, len(centres), n)
    x = centres[labels] + rng.standard_normal((n, dim), dtype=np.float32) * (noise / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return torch.from_numpy(x), torch.from_numpy(labels)


def ours(x, y, include=("recall", "nmi", "r_precision", "map_at_r"), knn_backend="auto"):
    return retrieval_metrics(x, y, recall_ks=(1,), include=include, seed=1234, knn_backend=knn_backend)


def theirs(x, y, include=(*RANKING, "NMI")):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=include, k="max_bin_count", device=torch.device("cpu"))
    return {AC_NAMES[k]: v for k, v in calc.get_accuracy(x, y, x, y, ref_includes_query=True).items()}


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,60000", help="comma-separated N")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--class-size", type=int, default=50, help="mean items per class")
    parser.add_argument("--noise", type=float, default=1.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-parts", action="store_true", help="skip the per-part timings")
    parser.add_argument("--knn-backend", default="auto", help="glassmetric's kNN backend (auto, torch, faiss)")
    parser.add_argument("--threads", type=int, default=None, help="torch and faiss threads")
    args = parser.parse_args()

    import faiss
    import pytorch_metric_learning

    logging.getLogger("faiss").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    print(
        f"{platform.machine()}, {os.cpu_count()} CPU cores, load average "
        f"{' / '.join(f'{v:.2f}' for v in os.getloadavg())}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), faiss {faiss.__version__} "
        f"({faiss.omp_get_max_threads()} threads), pytorch-metric-learning {pytorch_metric_learning.__version__}"
    )
    print(
        "| N | classes | kNN path | ours s | theirs s | speed-up | parts ours (ranking / nmi) | "
        "parts theirs (ranking / nmi) | max abs difference (points) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        x, y = clustered(n, args.dim, args.class_size, args.noise)
        times = {"ours": [], "theirs": []}
        for _ in range(args.repeat):
            t, ours_out = timed(ours, x, y, knn_backend=args.knn_backend)
            times["ours"].append(t)
            t, theirs_out = timed(theirs, x, y)
            times["theirs"].append(t)
        diff = max(abs(ours_out[k] - theirs_out[k]) for k in theirs_out) * 100
        parts_ours = parts_theirs = "-"
        if not args.no_parts:
            r_o, _ = timed(ours, x, y, ("recall", "r_precision", "map_at_r"), args.knn_backend)
            n_o, _ = timed(ours, x, y, ("nmi",), args.knn_backend)
            r_t, _ = timed(theirs, x, y, RANKING)
            n_t, _ = timed(theirs, x, y, ("NMI",))
            parts_ours, parts_theirs = f"{r_o:.2f} / {n_o:.2f}", f"{r_t:.2f} / {n_t:.2f}"
        best_o, best_t = min(times["ours"]), min(times["theirs"])
        path = auto_backend(n, n) if args.knn_backend == "auto" else args.knn_backend
        print(
            f"| {n:,} | {len(torch.unique(y)):,} | {path} | {best_o:.2f} | {best_t:.2f} | "
            f"{best_t / best_o:.2f}x | {parts_ours} | {parts_theirs} | {diff:.4f} |",
            flush=True,
        )
        print("  ours:  ", {k: round(v, 6) for k, v in ours_out.items()})
        print("  theirs:", {k: round(theirs_out[k], 6) for k in ours_out})
    print(
        f"load average at the end: {' / '.join(f'{v:.2f}' for v in os.getloadavg())}; "
        "speed-up = theirs / ours (best of each); points = percentage points"
    )


if __name__ == "__main__":
    main()
