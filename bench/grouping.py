"""Benchmark: the training-step time of attentive grouping (DGML) against the same model without it.

One training step = forward (backbone, heads) + loss (with groups: the metric loss on each of
the k groups, averaged, + the diversity loss) + backward + optimiser step (Adam, the learning
rates of the run). Both models are built from the same preset by
:func:`glassmetric.training.module.build_model_from_config` and
:func:`~glassmetric.training.module.build_training_loss`, differing only in ``model.groups``,
and run on the same random batch (``batch / samples_per_class`` classes, ``samples_per_class``
images each). Rounds are interleaved (plain, grouped, grouped, plain, ...) after warm-up steps,
so both see the same machine load. Reported: the best step time of each (the least disturbed
by other jobs), their ratio, and the median and range of the per-round ratios.

    python bench/grouping.py [--settings demo,dgml] [--rounds 7] [--threads 1] [--losses margin,multisimilarity]

Settings: ``demo`` (ResNet-18 from scratch, 64 px, batch 64 = 16 x 4, 96-d), ``dgml`` (the paper
setting: ResNet-50, 224 px, 510-d; the batch is reduced to 16 = 8 x 2 so that a step fits a
2-core CPU in seconds; the ratio is what is compared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from glassmetric.config import load_config
from glassmetric.training.module import build_model_from_config, build_training_loss

SETTINGS = {
    "demo": ("demo", ["model.embedding_dim=96"], 64),
    "dgml": ("dgml", ["model.pretrained=false", "trainer.batch_size=16"], 224),
}


def make_step(preset: str, overrides: list[str], groups: int, loss: str, device):
    cfg = load_config(preset, overrides + [f"model.groups={groups}", f"loss.name={loss}"])
    torch.manual_seed(0)
    model = build_model_from_config(cfg).to(device).train()
    n_classes = cfg.trainer.batch_size // cfg.trainer.samples_per_class
    criterion = build_training_loss(cfg, n_classes).to(device)
    params = [p for p in list(model.parameters()) + list(criterion.parameters()) if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.optim.lr)
    labels = torch.arange(n_classes, device=device).repeat_interleave(cfg.trainer.samples_per_class)
    return cfg, model, criterion, optimizer, labels


def run_step(model, criterion, optimizer, images, labels) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = criterion(model(images), labels)
    loss.backward()
    optimizer.step()


def bench(setting: str, loss: str, rounds: int, steps: int, device) -> dict:
    preset, overrides, size = SETTINGS[setting]
    variants = {name: make_step(preset, overrides, g, loss, device) for name, g in (("plain", 0), ("grouped", 3))}
    cfg = variants["plain"][0]
    images = torch.randn(cfg.trainer.batch_size, 3, size, size, device=device)
    for _, model, criterion, opt, labels in variants.values():  # warm-up
        run_step(model, criterion, opt, images, labels)
    times = {name: [] for name in variants}
    for r in range(rounds):
        order = list(variants.items()) if r % 2 == 0 else list(variants.items())[::-1]  # ABBA: no order bias
        for name, (_, model, criterion, opt, labels) in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                run_step(model, criterion, opt, images, labels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / steps)
    best = {name: min(t) for name, t in times.items()}
    per_round = [g / p for p, g in zip(times["plain"], times["grouped"])]
    return {
        "setting": setting, "loss": loss, "batch": cfg.trainer.batch_size, "size": size,
        "backbone": cfg.model.backbone, "dim": cfg.model.embedding_dim,
        "plain_s": best["plain"], "grouped_s": best["grouped"], "ratio": best["grouped"] / best["plain"],
        "ratio_median": statistics.median(per_round), "ratio_min": min(per_round), "ratio_max": max(per_round),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="demo,dgml")
    parser.add_argument("--losses", default="margin,multisimilarity")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed block")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine more threads time the scheduler)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} torch threads"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device: {where}; load average at start {load:.1f}; {args.rounds} interleaved rounds of {args.steps} steps")
    print("| setting | loss | batch | plain step (best) | grouped step, k = 3 (best) | ratio of best | per-round ratio: median (range) |")
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings.split(","):
        for loss in args.losses.split(","):
            r = bench(setting, loss, args.rounds, args.steps, device)
            print(f"| {r['setting']} ({r['backbone']}, {r['size']} px, {r['dim']}-d) | {r['loss']} | {r['batch']} | "
                  f"{1000 * r['plain_s']:.0f} ms | {1000 * r['grouped_s']:.0f} ms | {r['ratio']:.3f}x | "
                  f"{r['ratio_median']:.3f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}x) |", flush=True)
    end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at the end {end:.1f}")


if __name__ == "__main__":
    np.random.seed(0)
    main()
