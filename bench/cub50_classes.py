"""Why metric training barely moves R@1 on CUB-50: the gain against the number of training classes.

    python bench/cub50_classes.py [--classes 15 20 30] [--seeds 0 1] [--no-write]

One fixed test set, CUB classes 31-50 (1,188 images), and the ``cub50`` preset (ImageNet Lite0,
MultiSimilarity, 4 epochs) trained on classes 1..n for each n, with no validation classes (the
last epoch is kept, so every n gets the same recipe and the same number of epochs; more
classes mean more steps). If the first neighbour gains more with more training classes, the
flat R@1 of the 25-class benchmark is a matter of how many bird species the model sees, as
the full-CUB papers (100 training classes) suggest. The R@1 on the training classes' own images
(before and after training) shows how much the model learnt about the species it saw. The table replaces the block between the
``cub50-classes`` markers in BENCHMARKS.md. Finished runs under ``--out`` are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from cub50 import COLUMNS, CUB50, ROOT, PooledFeatures, mean_std, score
from markdown_block import write_block

from glassmetric.checkpoints import load_trained
from glassmetric.config import load_config
from glassmetric.factory import build_model_from_config, eval_transform, make_splits
from glassmetric.retrieval.evaluate import evaluate_model
from glassmetric.training.fit import fit

TEST = [31, 50]


def overrides(n: int) -> list[str]:
    return [
        f"data.root={CUB50}",
        f"data.train_classes=[1,{n}]",
        f"data.test_classes={TEST}".replace(" ", ""),
        "data.val_classes=0",
        "trainer.select=last",
        "trainer.progress_bar=false",
    ]


def seen_classes(model, cfg) -> dict:
    """Metrics on the training classes' own images (eval transform): what the model learnt about
    the species it saw, against which the test classes measure what transfers."""
    train = make_splits(cfg, build_model_from_config(cfg)).train
    train.transform = eval_transform(cfg, model)
    return evaluate_model(model, train, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, device="cpu")


def trained_seen(n: int, seed: int, out: Path) -> dict:
    """:func:`seen_classes` of the run on classes 1..n (cached next to it)."""
    folder = out / f"classes{n}-seed{seed}"
    cache = folder / "bench_seen.json"
    if not cache.is_file():
        model, cfg = load_trained(str(folder / "checkpoints" / "last.ckpt"), [f"data.root={CUB50}"])
        cache.write_text(json.dumps(seen_classes(model, cfg), default=float))
    return json.loads(cache.read_text())


def pretrained_seen(n: int, out: Path) -> dict:
    """:func:`seen_classes` of the ImageNet features on classes 1..n (cached)."""
    cache = out / f"pretrained_seen{n}.json"
    if not cache.is_file():
        cfg = load_config("cub50", overrides(n))
        out.mkdir(parents=True, exist_ok=True)
        cache.write_text(
            json.dumps(seen_classes(PooledFeatures(build_model_from_config(cfg).backbone), cfg), default=float)
        )
    return json.loads(cache.read_text())


def trained(n: int, seed: int, out: Path) -> dict:
    """Test metrics of the preset trained on classes 1..n (cached next to the run)."""
    folder = out / f"classes{n}-seed{seed}"
    cache = folder / "bench_classes.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    cfg = load_config("cub50", [*overrides(n), f"seed={seed}", f"trainer.output_dir={folder}"])
    result = fit(cfg, overwrite=True, run_test=False)
    model, trained_cfg = load_trained(str(result.checkpoint), [f"data.root={CUB50}"])
    run = score(model, trained_cfg)
    run["epoch_seconds"] = result.epoch_seconds
    cache.write_text(json.dumps(run, default=float))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[15, 20, 30])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_cub50_classes"))
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    if not (CUB50 / "images.txt").is_file():
        raise SystemExit(f"bench/cub50_classes.py needs the CUB-50 subset at {CUB50}")
    if max(args.classes) >= TEST[0]:
        raise SystemExit(f"--classes: the training classes 1..n must stay below the test classes {TEST[0]}-{TEST[1]}")
    started, out = time.perf_counter(), Path(args.out)
    cfg = load_config("cub50", overrides(max(args.classes)))
    reference = score(PooledFeatures(build_model_from_config(cfg).backbone), cfg)["metrics"]
    print(json.dumps({"pretrained": reference}), flush=True)

    lines = [
        "| training classes | seeds | R@1 | R@2 | R@4 | R@8 | NMI | RP | MAP@R | gain R@1 | gain MAP@R | "
        "seen classes R@1: pretrained -> trained | s / epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| none (ImageNet Lite0, GAP 1280-d) | - | "
        + " | ".join(f"{100 * reference[c]:.2f}" for c in COLUMNS)
        + " | - | - | - | - |",
    ]
    for n in args.classes:
        runs = []
        for seed in args.seeds:
            runs.append(trained(n, seed, out))
            print(json.dumps({"classes": n, "seed": seed, **runs[-1]}, default=float), flush=True)
        cells = [mean_std([r["metrics"][c] for r in runs]) for c in COLUMNS]
        gains = [mean_std([r["metrics"][c] - reference[c] for r in runs]) for c in ("recall@1", "map_at_r")]
        seconds = mean_std([s for r in runs for s in r["epoch_seconds"]], 1, 0)
        seen = [trained_seen(n, seed, out)["recall@1"] for seed in args.seeds]
        seen_cell = f"{100 * pretrained_seen(n, out)['recall@1']:.2f} -> {mean_std(seen)}"
        lines.append(f"| 1-{n} | {len(runs)} | " + " | ".join(cells + gains) + f" | {seen_cell} | {seconds} |")

    command = " ".join(["python bench/cub50_classes.py", *sys.argv[1:]])
    text = (
        f"Measured by `{command}` on {os.cpu_count()} CPU cores, torch {torch.__version__}; total "
        f"{(time.perf_counter() - started) / 60:.0f} min (finished runs reused). Test classes {TEST[0]}-{TEST[1]}; "
        "percentages; mean ± std over seeds; gains are against the pretrained row, on the same images.\n\n"
        + "\n".join(lines)
    )
    print("\n" + text)
    if not args.no_write:
        write_block("cub50-classes", text, "CUB-50 real birds: R@1 gain against the number of training classes")


if __name__ == "__main__":
    main()
