"""Benchmark: the faiss gallery index (HNSW, IVF) against exact search, same data, same run.

Data: a mixture of Gaussians, not uniform noise (in which nearest neighbours are nearly
arbitrary and recall means little): N / ``--per-cluster`` random unit centres, each vector a
centre plus isotropic noise of norm about ``--noise`` (1.5: cosine ~0.55 to its centre, ~0.3
between two vectors of one cluster, so clusters overlap and an IVF cell does not hold a whole
neighbourhood), L2-normalised; queries are fresh draws from the same mixture. For each gallery
size and dimension:

* exact: glassmetric's chunked torch kNN (:func:`glassmetric.retrieval.knn.knn`) and faiss
  ``IndexFlatIP`` (the ``exact`` kind of the index); the top 10 of the torch search is the
  ground truth;
* ``hnsw`` (built where N <= ``--hnsw-max``: graph construction is the slow part on few
  cores) and ``ivf`` with the library defaults (:class:`glassmetric.config.IndexConfig`): the
  search tuned to ``target_recall`` (``[default]``), then searched again with fixed
  ``ef_search`` / ``nprobe`` values on the same index (the untuned knobs).

Reported: build seconds, tuning seconds (estimating recall@10 on 200 gallery items and raising
the knob), queries per second (``--queries`` queries in one batch, best of ``--repeat``),
recall@10 = the share of the exact top 10 found in the index's top 10.

    python bench/index.py [--sizes 100000,1000000] [--dims 128,512] [--queries 500] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import numpy as np
import torch

from glassmetric.config import IndexConfig
from glassmetric.retrieval.index import GalleryIndex
from glassmetric.retrieval.knn import knn


def mixture(
    n: int, dim: int, centres: np.ndarray, noise: float, rng: np.random.Generator, chunk: int = 200_000
) -> np.ndarray:
    """``n`` unit vectors: a random centre + Gaussian noise of norm about ``noise``."""
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, dim), dtype=np.float32) * (
            noise / np.sqrt(dim)
        )
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def best_time(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    hits = (found[:, :, None] == truth[:, None, :]).any(2).sum()
    return float(hits) / truth.numel()


def run(n: int, dim: int, args) -> list[dict]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((max(1, n // args.per_cluster), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = mixture(n, dim, centres, args.noise, rng)
    q = mixture(args.queries, dim, centres, args.noise, rng)
    xt, qt = torch.from_numpy(x), torch.from_numpy(q)
    xd, qd = xt.to(args.device), qt.to(args.device)
    sync = torch.cuda.synchronize if xd.is_cuda else (lambda: None)
    rows = []
    t, (_, truth) = best_time(lambda qd=qd, xd=xd: (knn(qd, xd, args.k), sync())[0], args.repeat)
    truth = truth.cpu()
    del xd, qd
    rows.append(
        {"method": f"exact: torch kNN ({args.device})", "build": 0.0, "tune": 0.0, "qps": len(q) / t, "recall": 1.0}
    )
    plans = [("exact", {})]
    if n <= args.hnsw_max:
        plans.append(("hnsw", {"ef_search": [32, 128, 512]}))
    plans.append(("ivf", {"nprobe": [8, 32, 128, 512]}))
    for kind, sweep in plans:
        settings = IndexConfig(kind=kind)
        t0 = time.perf_counter()
        index = GalleryIndex.build(x, dataclasses.replace(settings, target_recall=None))
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        index.set_search_params(settings, x)  # the default: tuned to eval.index.target_recall
        tune = time.perf_counter() - t0
        fixed = [
            dataclasses.replace(settings, **{key: v}, target_recall=None) for key, vals in sweep.items() for v in vals
        ]
        for s in [None, *fixed]:
            if s is not None:
                index.set_search_params(s)
            t, (_, ids) = best_time(lambda index=index: index.search(qt, args.k), args.repeat)
            knobs = ", ".join(f"{k} {v}" for k, v in index.params.items() if k != "recall@10")
            label = f"{kind}" + (f" ({knobs})" if knobs else " (faiss IndexFlatIP)")
            if s is None and kind != "exact":
                label += f" [default: tuned, estimated recall@10 {index.params['recall@10']:.3f}]"
            rows.append(
                {
                    "method": label,
                    "build": build,
                    "tune": tune if s is None else 0.0,
                    "qps": len(q) / t,
                    "recall": recall(ids, truth),
                }
            )
            if kind == "exact":
                break
        del index
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dims", default="128,512")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--per-cluster", type=int, default=100, help="gallery vectors per mixture component")
    parser.add_argument("--noise", type=float, default=1.5, help="norm of the noise around a centre")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--hnsw-max", type=int, default=200_000, help="build HNSW only up to this gallery size")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch and faiss threads")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="of the torch kNN (faiss-cpu runs on the CPU)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    load = os.getloadavg()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores{gpu}, {args.threads} threads; "
        f"torch {torch.__version__}, faiss {faiss.__version__}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(f"{args.queries} queries, k = {args.k}, mixture of N / {args.per_cluster} components, noise {args.noise}\n")
    print("| N | dim | method | build s | tune s | queries/s | recall@10 |")
    print("|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        for dim in (int(d) for d in args.dims.split(",")):
            for r in run(n, dim, args):
                print(
                    f"| {n:,} | {dim} | {r['method']} | {r['build']:.1f} | {r['tune']:.1f} | {r['qps']:,.0f} | "
                    f"{r['recall']:.3f} |",
                    flush=True,
                )
    load = os.getloadavg()
    print(f"\nload average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
