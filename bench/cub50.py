"""Real-bird baselines on CUB-50 (../shared/data/cub50, test classes 26-50, 1,487 images).

    python bench/cub50.py [--seeds 0 1 2] [--losses multisimilarity margin proxyanchor] [--epochs N]

Rows: random-init EfficientNet-Lite0; ImageNet-pretrained Lite0 with no metric training
(global-average-pooled 1280-d features, resize 256 / crop 224, as the data README's reference);
and the ``cub50`` preset trained with each loss. Mean +- std over the seeds, wall time per
epoch, training and embedding throughput, and the share of training steps spent waiting for
data. The table replaces the block between the markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from markdown_block import write_block

from glassmetric.checkpoints import load_trained
from glassmetric.config import load_config
from glassmetric.factory import build_model_from_config, eval_transform, make_splits
from glassmetric.models.output import EmbeddingOutput
from glassmetric.retrieval.evaluate import evaluate_model
from glassmetric.training.fit import fit

ROOT = Path(__file__).resolve().parents[1]
CUB50 = ROOT.parent / "shared" / "data" / "cub50"
COLUMNS = ["recall@1", "recall@2", "recall@4", "recall@8", "nmi", "r_precision", "map_at_r"]


class PooledFeatures(torch.nn.Module):
    """A backbone's L2-normalised global-average-pooled feature as the embedding."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> EmbeddingOutput:
        return EmbeddingOutput(embedding=F.normalize(self.backbone(images).mean(dim=(2, 3)), dim=1))


def score(model: torch.nn.Module, cfg) -> dict:
    """Test metrics of ``model`` and its embedding throughput (images/s, data loading included)."""
    test = make_splits(cfg, build_model_from_config(cfg)).test
    test.transform = eval_transform(cfg, model)
    start = time.perf_counter()
    metrics = evaluate_model(
        model, test, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, device="cpu"
    )
    return {"metrics": metrics, "embed_images_per_s": len(test) / (time.perf_counter() - start)}


def mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± std`` of the finite ``values`` (NaN ones left out), scaled; ``-`` when none."""
    values = [v for v in values if v == v]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def table(rows: dict[str, list[dict]]) -> str:
    lines = [
        "| model | seeds | R@1 | R@2 | R@4 | R@8 | NMI | RP | MAP@R | s / epoch | train img/s | data wait % | embed img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in rows.items():
        cells = [mean_std([r["metrics"][c] for r in runs]) for c in COLUMNS]
        cells += [
            mean_std([s for r in runs for s in r.get("epoch_seconds", [])], 1, 0),
            mean_std([r["train_images_per_s"] for r in runs if "train_images_per_s" in r], 1, 0),
            mean_std([r["data_wait_share"] for r in runs if "data_wait_share" in r], 100, 1),
            mean_std([r["embed_images_per_s"] for r in runs], 1, 0),
        ]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_logged(csv_path: Path, key: str) -> float:
    with open(csv_path) as f:
        return statistics.mean(float(r[key]) for r in csv.DictReader(f) if r.get(key))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", default=["multisimilarity", "margin", "proxyanchor"])
    parser.add_argument("--epochs", type=int, help="override trainer.max_epochs of the preset")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_cub50"))
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    if not (CUB50 / "images.txt").is_file():
        raise SystemExit(f"bench/cub50.py needs the CUB-50 subset at {CUB50}")
    base = [f"data.root={CUB50}"] + ([f"trainer.max_epochs={args.epochs}"] if args.epochs else [])
    rows: dict[str, list[dict]] = {}
    started = time.perf_counter()

    for seed in args.seeds:
        cfg = load_config("cub50", [*base, f"seed={seed}", "model.pretrained=false"])
        torch.manual_seed(seed)
        rows.setdefault("Lite0, random init, GAP 1280-d", []).append(
            score(PooledFeatures(build_model_from_config(cfg).backbone), cfg)
        )
    cfg = load_config("cub50", base)
    rows["Lite0, ImageNet, no metric training, GAP 1280-d"] = [
        score(PooledFeatures(build_model_from_config(cfg).backbone), cfg)
    ]

    for loss in args.losses:
        for seed in args.seeds:
            out = Path(args.out) / f"{loss}-seed{seed}"
            cfg = load_config(
                "cub50",
                [*base, f"seed={seed}", f"loss.name={loss}", f"trainer.output_dir={out}", "trainer.progress_bar=false"],
            )
            result = fit(cfg, overwrite=True, run_test=False)
            model, trained_cfg = load_trained(str(result.checkpoint))
            run = score(model, trained_cfg)
            run.update(
                epoch_seconds=result.epoch_seconds,
                data_wait_share=result.data_wait_share,
                train_images_per_s=mean_logged(out / "logs" / "version_0" / "metrics.csv", "perf/train_images_per_s"),
            )
            rows.setdefault(f"cub50 preset + {loss}", []).append(run)
            print(json.dumps({"loss": loss, "seed": seed, **run}), flush=True)

    command = " ".join(["python bench/cub50.py", *sys.argv[1:]])
    text = (
        f"Measured by `{command}` on {os.cpu_count()} CPU cores, torch {torch.__version__}; "
        f"total {(time.perf_counter() - started) / 60:.0f} min. Percentages; mean ± std over seeds.\n\n" + table(rows)
    )
    print("\n" + text)
    if not args.no_write:
        write_block("cub50", text, "CUB-50 real birds: baselines")


if __name__ == "__main__":
    main()
