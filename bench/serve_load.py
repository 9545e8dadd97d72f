"""Load test of `glassmetric serve` on 127.0.0.1: a fixed number of requests at a fixed
concurrency, then it stops the server and itself.

The server is started as the real command (``python -m glassmetric.cli serve``) on a free
port; once its gallery is embedded (or loaded from the cache) and one request of each kind
has warmed it up, REQUESTS requests are sent, CONCURRENCY at a time, drawn (seeded) from a mix:
search with a gallery image (GET /api/search, k = 10, with structural / introspective scores),
search with an uploaded PNG (POST /api/search) and explain a pair (GET /api/explain + its
figures: a fresh pair each time, so no figure comes from the cache). Reported: errors (any
status but 200), the p50 / p99 latency of each kind and of all, the throughput, and the
server's resident memory (VmRSS) before and after the load, and its peak (VmHWM).

    python bench/serve_load.py                                  # the demo checkpoint, its test split as gallery
    python bench/serve_load.py --checkpoint CKPT --gallery DIR --requests 1000 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

MIX = (("search_gallery", 0.6), ("search_upload", 0.3), ("explain", 0.1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]  # nearest rank


async def _load(url: str, n: int, concurrency: int, gallery_size: int, seed: int) -> dict:
    rng = random.Random(seed)
    kinds = rng.choices([k for k, _ in MIX], weights=[w for _, w in MIX], k=n)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        uploads = [(await client.get(f"/api/images/g{rng.randrange(gallery_size)}")).content for _ in range(8)]
        jobs = []
        for i, kind in enumerate(kinds):
            if kind == "search_gallery":
                jobs.append(
                    (kind, ("GET", "/api/search", {"params": {"query": f"g{rng.randrange(gallery_size)}", "k": 10}}))
                )
            elif kind == "search_upload":
                jobs.append(
                    (
                        kind,
                        (
                            "POST",
                            "/api/search",
                            {"files": {"image": ("q.png", uploads[i % len(uploads)], "image/png")}},
                        ),
                    )
                )
            else:
                q, r = rng.sample(range(gallery_size), 2)
                jobs.append((kind, ("GET", "/api/explain", {"params": {"query": f"g{q}", "result": f"g{r}"}})))
        gate = asyncio.Semaphore(concurrency)
        latencies: dict[str, list[float]] = {k: [] for k, _ in MIX}
        errors: list[str] = []

        async def one(kind, request):
            method, path, kw = request
            async with gate:
                start = time.perf_counter()
                try:
                    res = await client.request(method, path, **kw)
                    ok = res.status_code == 200
                    if ok and kind == "explain":  # the figures are part of an explanation
                        for fig in res.json()["figures"].values():
                            f = await client.get(fig)
                            ok = ok and f.status_code == 200
                    if not ok:
                        errors.append(f"{kind}: {res.status_code} {res.text[:120]}")
                except httpx.HTTPError as e:
                    errors.append(f"{kind}: {type(e).__name__} {e}")
                latencies[kind].append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(one(kind, request) for kind, request in jobs))
        wall = time.perf_counter() - start
    every = [v for values in latencies.values() for v in values]
    rows = {
        kind: {"requests": len(v), "p50_ms": 1000 * _percentile(v, 50), "p99_ms": 1000 * _percentile(v, 99)}
        for kind, v in latencies.items()
        if v
    }
    rows["all"] = {
        "requests": len(every),
        "p50_ms": 1000 * _percentile(every, 50),
        "p99_ms": 1000 * _percentile(every, 99),
    }
    return {
        "latency": rows,
        "errors": len(errors),
        "error_examples": errors[:5],
        "wall_s": wall,
        "throughput_rps": n / wall,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="runs/demo/checkpoints/best.ckpt")
    ap.add_argument("--gallery", help="gallery folder (default: the checkpoint's test split)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1, help="the server's model threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    if not Path(args.checkpoint).is_file():
        sys.exit(f"serve_load: no checkpoint at {args.checkpoint} (run `make demo` first, or pass --checkpoint)")
    port = _free_port()
    cache = tempfile.mkdtemp(prefix="glassmetric-load-cache-")
    cmd = [
        sys.executable,
        "-m",
        "glassmetric.cli",
        "serve",
        "--checkpoint",
        args.checkpoint,
        "--port",
        str(port),
        "--cache-dir",
        cache,
        "--device",
        "cpu",
        "--workers",
        str(args.workers),
    ]
    if args.gallery:
        cmd += ["--gallery", args.gallery]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if server.poll() is not None:
                sys.exit(f"serve_load: the server exited with status {server.returncode}: {' '.join(cmd)}")
            try:
                info = httpx.get(url + "/api/info", timeout=5).json()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    sys.exit("serve_load: the server did not come up within 15 minutes")
                time.sleep(0.5)
        asyncio.run(_load(url, 3, 1, info["gallery_size"], args.seed + 1))  # warm-up: one of each kind, roughly
        before = _memory_kib(server.pid)
        result = asyncio.run(_load(url, args.requests, args.concurrency, info["gallery_size"], args.seed))
        after = _memory_kib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    result.update(
        checkpoint=args.checkpoint,
        gallery=info["gallery"],
        gallery_size=info["gallery_size"],
        fields=info["fields"],
        requests=args.requests,
        concurrency=args.concurrency,
        workers=args.workers,
        rss_before_mib=before["VmRSS"] / 1024,
        rss_after_mib=after["VmRSS"] / 1024,
        rss_peak_mib=after["VmHWM"] / 1024,
        cpus=os.cpu_count(),
    )
    print(
        f"{args.requests} requests, {args.concurrency} at a time, against {info['gallery']} ({info['gallery_size']} images, "
        f"fields {', '.join(info['fields'])}): {result['errors']} errors, {result['wall_s']:.1f} s, {result['throughput_rps']:.1f} requests/s"
    )
    print("| request | count | p50 (ms) | p99 (ms) |\n|---|---|---|---|")
    for kind, row in result["latency"].items():
        print(f"| {kind} | {row['requests']} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} |")
    print(
        f"server RSS: {result['rss_before_mib']:.0f} MiB before, {result['rss_after_mib']:.0f} MiB after, peak {result['rss_peak_mib']:.0f} MiB"
    )
    for e in result["error_examples"]:
        print("  error:", e)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
