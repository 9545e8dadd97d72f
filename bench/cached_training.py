"""Benchmark: a training epoch on cached features (``trainer.cache_features``) against the same
epoch on images, on real birds.

    python bench/cached_training.py [--classes 15] [--epochs 2] [--views 4] [--no-write]

The ``cub50`` preset as it is (ImageNet EfficientNet-Lite0 at 224 px, blocks 5-6 and conv_head
training, frozen BatchNorm, batch 60, MultiSimilarity) on its first ``--classes`` training
species of ``../shared/data/cub50``, without validation or test. Four runs in ABBA order, so
both paths see the same machine load: uncached, cached (computes the cache), cached again
(reuses it: ``--overwrite`` keeps the file), uncached. Reported: the median epoch of each path,
their ratio, the one-time cost of the cache (seconds, and in uncached epochs), and the number
of epochs after which the cache has paid for itself, cost / (uncached epoch - cached epoch).
The table replaces the block between the markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from markdown_block import write_block

from glassmetric.config import load_config
from glassmetric.training.fit import FitResult, fit

ROOT = Path(__file__).resolve().parents[1]
CUB50 = ROOT.parent / "shared" / "data" / "cub50"


def run(out: Path, classes: int, epochs: int, views: int) -> FitResult:
    cfg = load_config(
        "cub50",
        [
            f"data.root={CUB50}",
            f"data.train_classes=[1, {classes}]",
            "data.val_classes=0",
            "trainer.select=last",
            f"trainer.max_epochs={epochs}",
            "trainer.progress_bar=false",
            f"trainer.cache_features={views}",
            f"trainer.output_dir={out}",
        ],
    )
    return fit(cfg, overwrite=True, run_test=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--classes",
        type=int,
        default=15,
        help="training species 1..N of cub50 (default 15: the preset's batch holds 15 classes)",
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    parser.add_argument("--views", type=int, default=4, help="cached views per image, V (default 4)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md as it is")
    args = parser.parse_args()
    if not CUB50.is_dir():
        raise SystemExit(f"bench/cached_training.py: error: {CUB50} not found (see ../shared/data/README.md)")

    start, load_before = time.perf_counter(), os.getloadavg()[0]
    uncached: list[float] = []
    cached: list[float] = []
    build = 0.0
    images = 0
    order: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cached-training-") as tmp:
        for name, views in (("uncached", 0), ("cached", args.views), ("cached", args.views), ("uncached", 0)):
            result = run(Path(tmp) / name, args.classes, args.epochs, views)
            (cached if views else uncached).extend(result.epoch_seconds)
            build = build or result.cache_build_seconds
            what = "built the cache" if result.cache_build_seconds else "reused it" if views else "images"
            order.append(f"{name} ({what}) {', '.join(f'{e:.1f}' for e in result.epoch_seconds)} s")
            print(f"{name}: epochs {[round(s, 1) for s in result.epoch_seconds]} s", flush=True)
        cache_file = Path(tmp) / "cached" / "feature_cache.pt"
        cache_mib = cache_file.stat().st_size / 2**20
        images = int(torch.load(cache_file, mmap=True, weights_only=True)["present"].sum())
    load_after = os.getloadavg()[0]
    u, c = statistics.median(uncached), statistics.median(cached)
    amortised = build / (u - c) if u > c else float("inf")
    text = "\n".join(
        [
            f"Measured by `python bench/cached_training.py --classes {args.classes} --epochs {args.epochs} "
            f"--views {args.views}` on 2 CPU cores shared with other jobs (load average {load_before:.1f} at the "
            f"start, {load_after:.1f} at the end), torch {torch.__version__}; total "
            f"{(time.perf_counter() - start) / 60:.0f} min. The cub50 preset on classes 1-{args.classes} "
            f"({images} training images, {args.views} views each), 224 px; medians of "
            f"{len(uncached)} epochs per path. The runs in order: {'; '.join(order)}.",
            "",
            "| path | s / epoch | ratio to uncached | one-time cost | cost in uncached epochs | epochs to amortise | cache size |",
            "|---|---|---|---|---|---|---|",
            f"| uncached (images) | {u:.1f} | 1.00 | - | - | - | - |",
            f"| cached features (float16) | {c:.1f} | {c / u:.2f} ({u / c:.1f}x faster) | {build:.0f} s | "
            f"{build / u:.1f} | {amortised:.1f} | {cache_mib:,.0f} MiB |",
        ]
    )
    print(text)
    if not args.no_write:
        write_block(
            "cached-training",
            text,
            "Training on cached features: epoch time (`python bench/cached_training.py`)",
        )


if __name__ == "__main__":
    main()
