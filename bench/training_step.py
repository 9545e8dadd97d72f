"""Benchmark: the training-step time of a method against the same model without it.

One training step = forward (backbone, heads) + loss + backward + optimiser step (Adam), as
:meth:`glassmetric.training.module.MetricLearner.objective` computes it for a training step
(mixup included when the variant switches it on). Every variant is built from the same preset and differs from the
plain model only by the method's overrides; all run on the same random batch. Rounds are
interleaved in ABBA order after a warm-up step, so all variants see the same machine load.
Reported: the best step time of each variant (the least disturbed by other jobs), its ratio to
the plain model's, and the median and range of the per-round ratios.

    python bench/training_step.py --method introspective [--settings demo,paper] [--losses proxyanchor,multisimilarity]
    python bench/training_step.py --method grouping --losses margin,multisimilarity --rounds 9 --steps 1

Settings: ``demo`` (the ``demo_scratch`` preset: ResNet-18 from scratch, 64 px, batch 64 = 16 x 4; 64-d, 96-d for 3 groups)
and the method's paper setting (``paper``: ResNet-50 at 224 px without downloading weights, the
batch cut to 16 so that a step takes seconds on a 2-core CPU; the ratio is what is compared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from glassmetric.config import load_config
from glassmetric.training.module import MetricLearner

#: method -> paper preset, overrides of its demo setting, [(variant, overrides)] (the first is the
#: plain model); ``{dim}`` in an override is the setting's embedding size
METHODS = {
    "introspective": {
        "paper": "idml",
        "demo": [],
        "variants": [
            ("plain", ["model.uncertainty_dim=0", "loss.similarity=global", "loss.mixup=false"]),
            ("introspective", ["model.uncertainty_dim={dim}", "loss.similarity=introspective", "loss.mixup=false"]),
            (
                "introspective + mixup",
                ["model.uncertainty_dim={dim}", "loss.similarity=introspective", "loss.mixup=true"],
            ),
        ],
    },
    "grouping": {
        "paper": "dgml",
        "demo": ["model.embedding_dim=96"],
        "variants": [("plain", ["model.groups=0"]), ("grouped, k = 3", ["model.groups=3"])],
    },
}
#: setting -> (preset, or None for the method's paper preset; overrides; image size)
SETTINGS = {
    "demo": ("demo_scratch", [], 64),
    "paper": (None, ["model.pretrained=false", "trainer.batch_size=16"], 224),
}


def build_variant(preset: str, overrides: list[str], device: torch.device):
    cfg = load_config(preset, overrides)
    n_classes = cfg.trainer.batch_size // cfg.trainer.samples_per_class
    torch.manual_seed(0)
    learner = MetricLearner(cfg, np.arange(n_classes)).to(device).train()
    optimizer = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=cfg.optim.lr)
    labels = torch.arange(n_classes, device=device).repeat_interleave(cfg.trainer.samples_per_class)
    return cfg, learner, optimizer, labels


def training_step(learner: MetricLearner, optimizer, images: torch.Tensor, labels: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss, _ = learner.objective(images, labels)
    loss.backward()
    optimizer.step()


def bench(method: str, setting: str, loss: str, rounds: int, steps: int, device: torch.device) -> dict:
    spec = METHODS[method]
    preset, extra, size = SETTINGS[setting]
    extra = extra + (spec["demo"] if setting == "demo" else []) + [f"loss.name={loss}"]
    preset = preset or spec["paper"]
    variants = spec["variants"]
    dim = load_config(preset, extra).model.embedding_dim
    built = {name: build_variant(preset, extra + [o.format(dim=dim) for o in over], device) for name, over in variants}
    cfg = next(iter(built.values()))[0]
    images = torch.randn(cfg.trainer.batch_size, 3, size, size, device=device)
    for _, learner, opt, labels in built.values():  # warm-up
        training_step(learner, opt, images, labels)
    times: dict[str, list[float]] = {name: [] for name in built}
    for r in range(rounds):
        order = list(built.items()) if r % 2 == 0 else list(built.items())[::-1]
        for name, (_, learner, opt, labels) in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                training_step(learner, opt, images, labels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / steps)
    plain = variants[0][0]
    rows = []
    for name in built:
        per_round = [t / p for p, t in zip(times[plain], times[name], strict=True)]
        rows.append(
            {
                "variant": name,
                "best_s": min(times[name]),
                "ratio": min(times[name]) / min(times[plain]),
                "median": statistics.median(per_round),
                "lo": min(per_round),
                "hi": max(per_round),
            }
        )
    return {
        "setting": setting,
        "preset": preset,
        "loss": loss,
        "batch": cfg.trainer.batch_size,
        "size": size,
        "backbone": cfg.model.backbone,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(METHODS), default="introspective")
    parser.add_argument("--settings", default="demo,paper")
    parser.add_argument("--losses", default="proxyanchor,multisimilarity")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed block")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (on a shared 2-core machine more threads time the scheduler)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} torch thread(s)"
    print(
        f"method {args.method}; device: {where}; load average at start {os.getloadavg()[0]:.1f}; "
        f"{args.rounds} interleaved rounds of {args.steps} steps"
    )
    print(
        "| setting | loss | batch | variant | step (best) | ratio of best to plain | per-round ratio: median (range) |"
    )
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings.split(","):
        for loss in args.losses.split(","):
            r = bench(args.method, setting, loss, args.rounds, args.steps, device)
            for row in r["rows"]:
                print(
                    f"| {r['preset']} ({r['backbone']}, {r['size']} px) | {r['loss']} | {r['batch']} | {row['variant']} | "
                    f"{1000 * row['best_s']:.0f} ms | {row['ratio']:.3f}x | {row['median']:.3f}x ({row['lo']:.2f}-{row['hi']:.2f}x) |",
                    flush=True,
                )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
