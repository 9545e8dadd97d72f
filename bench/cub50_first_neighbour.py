"""Which first neighbours metric training changes on CUB-50: fixed and broken R@1 queries.

    python bench/cub50_first_neighbour.py [--runs DIR ...] [--no-write]

For the ImageNet Lite0 features and each trained ``cub50`` checkpoint (by default the three
baseline runs of ``bench/real_birds.py``), on the 1,487 test images (classes 26-50): each
query's margin ``best same-class cosine - best other-class cosine`` (R@1 hit when > 0); how
many queries training fixes (a miss that becomes a hit), breaks (the reverse) and leaves
wrong; how many pretrained margins are near ties (|margin| < 0.02); and the correlation of
the trained margins with the pretrained ones (1: training did not move the first neighbours).
The table replaces the block between the ``cub50-first-neighbour`` markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from cub50 import CUB50, ROOT, PooledFeatures
from markdown_block import write_block

from glassmetric.checkpoints import load_trained
from glassmetric.config import load_config
from glassmetric.factory import build_model_from_config, eval_transform, make_splits
from glassmetric.retrieval.embed import embed_fields

NEAR_TIE = 0.02


def margins(model, cfg) -> torch.Tensor:
    """Each test query's best same-class minus best other-class cosine (leave-one-out)."""
    test = make_splits(cfg, build_model_from_config(cfg)).test
    test.transform = eval_transform(cfg, model)
    e = embed_fields(
        model, test, fields=["embedding"], batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers
    )
    x, y = F.normalize(e["embedding"].float(), dim=1), e["labels"]
    s = (x @ x.T).fill_diagonal_(-2.0)
    same = (y[:, None] == y[None, :]).fill_diagonal_(False)
    return s.masked_fill(~same, -2.0).amax(1) - s.masked_fill(same, -2.0).amax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = [str(ROOT / "runs" / "bench_birds" / f"baseline-seed{s}") for s in (0, 1, 2)]
    parser.add_argument("--runs", nargs="+", default=default, help="run folders with checkpoints/best.ckpt")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    if not (CUB50 / "images.txt").is_file():
        raise SystemExit(f"bench/cub50_first_neighbour.py needs the CUB-50 subset at {CUB50}")
    cfg = load_config("cub50", [f"data.root={CUB50}"])
    base = margins(PooledFeatures(build_model_from_config(cfg).backbone), cfg)
    hit0 = base > 0
    lines = [
        "| model | R@1 | fixed | broken | still wrong (of the pretrained misses) | margin correlation with pretrained |",
        "|---|---|---|---|---|---|",
        f"| Lite0 ImageNet features | {100 * hit0.float().mean():.2f} | - | - | {int((~hit0).sum())} misses, "
        f"{int((base.abs() < NEAR_TIE).sum())} near ties (abs margin < {NEAR_TIE}) | 1 |",
    ]
    for run in args.runs:
        ckpt = Path(run) / "checkpoints" / "best.ckpt"
        if not ckpt.is_file():
            raise SystemExit(
                f"--runs: {ckpt} does not exist (train it with python bench/real_birds.py --methods baseline)"
            )
        model, tcfg = load_trained(str(ckpt), [f"data.root={CUB50}"])
        m = margins(model, tcfg)
        hit = m > 0
        corr = torch.corrcoef(torch.stack([base, m]))[0, 1].item()
        lines.append(
            f"| {Path(run).name} | {100 * hit.float().mean():.2f} | {int((hit & ~hit0).sum())} | "
            f"{int((~hit & hit0).sum())} | {int((~hit & ~hit0).sum())} of {int((~hit0).sum())} | {corr:.3f} |"
        )
        print(lines[-1], flush=True)
    command = " ".join(["python bench/cub50_first_neighbour.py", *sys.argv[1:]])
    text = (
        f"Measured by `{command}` on {os.cpu_count()} CPU cores, torch {torch.__version__}; "
        f"{len(base)} test queries (classes 26-50).\n\n" + "\n".join(lines)
    )
    print("\n" + text)
    if not args.no_write:
        write_block("cub50-first-neighbour", text, "CUB-50 real birds: which first neighbours training changes")


if __name__ == "__main__":
    main()
