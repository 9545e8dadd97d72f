"""Benchmark: glassmetric's chunked exact kNN against peers in the same run.

Peers: faiss ``IndexFlatIP`` (exact) and a naive full-matrix ``torch.topk``. All three search
the same random L2-normalised embeddings (same set, self excluded) on the CPU.

    python bench/knn.py [--n 20000] [--dim 128] [--k 10] [--threads N]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from glassmetric.retrieval.knn import default_chunk_rows, knn

MiB = 2**20


def rss_mib() -> float:
    """High-water mark of the process' resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeat):
    fn()  # warm up (thread pools, allocator)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def naive(x, k):
    scores = x @ x.T
    scores.fill_diagonal_(float("-inf"))
    return scores.topk(k, dim=1)


def faiss_flat_ip(x, k):
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x.numpy())
    sims, idx = index.search(x.numpy(), k + 1)
    return torch.from_numpy(sims[:, 1:]), torch.from_numpy(idx[:, 1:])  # no ties here


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="queries = gallery items")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch and faiss threads")
    args = parser.parse_args()

    import faiss

    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    n, k = args.n, args.k
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, args.dim, generator=gen), dim=1)
    rows = default_chunk_rows(n)
    print(
        f"{n} x {n} x {args.dim}-d, k={k}, self excluded; torch threads "
        f"{torch.get_num_threads()}, faiss threads {faiss.omp_get_max_threads()}"
    )

    base = rss_mib()
    results = {}
    for name, fn, buffer in [
        ("glassmetric knn (chunked torch)", lambda: knn(x, x, k, exclude_self=True),
         min(rows, n) * n * 4),
        ("faiss IndexFlatIP", lambda: faiss_flat_ip(x, k),
         faiss.cvar.distance_compute_blas_query_bs
         * faiss.cvar.distance_compute_blas_database_bs * 4),
        ("naive full-matrix torch topk", lambda: naive(x, k), n * n * 4),
    ]:
        seconds, out = timed(fn, args.repeat)
        results[name] = (seconds, out, buffer, rss_mib() - base)

    ours_s, (ours_sims, ours_idx), _, _ = results["glassmetric knn (chunked torch)"]
    print(f"{'method':32s} {'time s':>7s} {'queries/s':>10s} {'vs ours':>8s} "
          f"{'score buffer':>13s} {'RSS peak +MiB':>13s} {'same idx':>8s}")
    for name, (seconds, (sims, idx), buffer, rss) in results.items():
        agree = (idx == ours_idx).double().mean().item()
        assert torch.allclose(sims, ours_sims, atol=1e-5), name
        print(
            f"{name:32s} {seconds:7.2f} {n / seconds:10.0f} {ours_s / seconds:7.2f}x "
            f"{buffer / MiB:9.0f} MiB {rss:13.0f} {agree:8.4f}"
        )
    print(f"chunk: {rows} queries of {n} scores (budget {rows * n * 4 / MiB:.0f} MiB); "
          "'vs ours' > 1 means faster than ours; RSS peaks are cumulative, in run order")


if __name__ == "__main__":
    main()
