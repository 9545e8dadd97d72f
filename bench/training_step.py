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

``--method structural`` (DIML's structural loss: ``model.spatial_grid=4 loss.similarity=structural``
against the global loss) uses the ``cub50`` preset as its paper setting: ImageNet
EfficientNet-Lite0 trained from block 5 on, 224 px, its batch of 60 = 15 x 4, on one batch of
real birds (CUB-200-2011 training classes through the preset's training transform, read from
``--cub-root``); a third variant solves the loss's plans on the torch solver instead of the
native lane kernel (what the kernel saves). ``--profile`` adds, per variant, the time of the
forward pass, the loss, the backward pass and the optimiser step, timed apart. ``--clock cpu``
times the CPU time of the process instead of the wall clock: with one torch thread that is the
step's own work, whatever other jobs share the cores.

    python bench/training_step.py --method structural --clock cpu [--settings demo,paper] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from glassmetric.config import load_config
from glassmetric.factory import make_splits
from glassmetric.similarity import lane_sinkhorn
from glassmetric.training.module import MetricLearner

CUB50 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cub50"

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
    "structural": {
        "paper": "cub50",
        "paper_overrides": [],  # the preset as it trains: pretrained weights, batch 60, real birds
        "real_images": True,
        "losses": "multisimilarity",
        "demo": [],
        "variants": [
            ("plain", ["model.spatial_grid=0", "loss.similarity=global"]),
            ("structural, 4 x 4", ["model.spatial_grid=4", "loss.similarity=structural"]),
            ("structural, 4 x 4, torch solver", ["model.spatial_grid=4", "loss.similarity=structural"]),
        ],
        #: variants whose loss solves its plans on the torch solver (the lane kernel switched off)
        "torch_solver": {"structural, 4 x 4, torch solver"},
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


def real_batch(cfg, learner: MetricLearner, root: Path) -> torch.Tensor:
    """One training batch of real images (``samples_per_class`` of each of the first
    ``batch_size / samples_per_class`` training classes) through the preset's training transform,
    read from ``root`` (the preset's data set at another place)."""
    cfg.data.root = str(root)
    train = make_splits(cfg, learner.model).train
    torch.manual_seed(0)  # the random crops
    per_class, rows = cfg.trainer.samples_per_class, []
    for c in train.classes[: cfg.trainer.batch_size // per_class]:
        rows += [int(i) for i in np.flatnonzero(train.labels == c)[:per_class]]
    return torch.stack([train[i]["image"] for i in rows])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_step(learner: MetricLearner, optimizer, images: torch.Tensor, labels: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss, _ = learner.objective(images, labels)
    loss.backward()
    optimizer.step()


#: the clocks a step is timed with: the wall clock, or the CPU time of the process
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def profiled_step(
    learner: MetricLearner, optimizer, images, labels, device, clock=time.perf_counter
) -> dict[str, float]:
    """One training step (no mixup) with its forward pass, loss, backward pass and optimiser
    step timed apart."""
    out: dict[str, float] = {}
    marks = [clock()]

    def mark(name: str) -> None:
        _sync(device)
        marks.append(clock())
        out[name] = marks[-1] - marks[-2]

    optimizer.zero_grad(set_to_none=True)
    output = learner.model(images)
    mark("forward")
    loss = learner.loss(output, labels)
    mark("loss")
    loss.backward()
    mark("backward")
    optimizer.step()
    mark("optimiser")
    return out


def _solver(spec: dict, name: str):
    """The context of a variant's steps: the lane kernel switched off for torch-solver variants."""
    return lane_sinkhorn.disabled() if name in spec.get("torch_solver", ()) else contextlib.nullcontext()


def bench(
    method: str,
    setting: str,
    loss: str,
    rounds: int,
    steps: int,
    device: torch.device,
    cub_root: Path = CUB50,
    profile: bool = False,
    clock=time.perf_counter,
) -> dict:
    spec = METHODS[method]
    preset, extra, size = SETTINGS[setting]
    if preset is None and "paper_overrides" in spec:
        extra = list(spec["paper_overrides"])
    extra = extra + (spec["demo"] if setting == "demo" else []) + [f"loss.name={loss}"]
    preset = preset or spec["paper"]
    variants = spec["variants"]
    dim = load_config(preset, extra).model.embedding_dim
    built = {name: build_variant(preset, extra + [o.format(dim=dim) for o in over], device) for name, over in variants}
    cfg, first = next(iter(built.values()))[:2]
    real = spec.get("real_images") and preset != "demo"
    if real:
        images = real_batch(cfg, first, cub_root).to(device)
        size = images.shape[-1]
    else:
        images = torch.randn(cfg.trainer.batch_size, 3, size, size, device=device)
    for name, (_, learner, opt, labels) in built.items():  # warm-up (and the kernel's build)
        with _solver(spec, name):
            training_step(learner, opt, images, labels)
    times: dict[str, list[float]] = {name: [] for name in built}
    for r in range(rounds):
        order = list(built.items()) if r % 2 == 0 else list(built.items())[::-1]
        for name, (_, learner, opt, labels) in order:
            with _solver(spec, name):
                _sync(device)
                start = clock()
                for _ in range(steps):
                    training_step(learner, opt, images, labels)
                _sync(device)
            times[name].append((clock() - start) / steps)
    parts: dict[str, dict[str, float]] = {}
    if profile:  # the best of `rounds` profiled steps, part by part
        for _ in range(rounds):
            for name, (_, learner, opt, labels) in built.items():
                with _solver(spec, name):
                    step = profiled_step(learner, opt, images, labels, device, clock)
                best = parts.setdefault(name, step)
                for k, v in step.items():
                    best[k] = min(best[k], v)
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
                "parts": parts.get(name),
            }
        )
    return {
        "images": "real birds" if real else "random",
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
    parser.add_argument(
        "--losses", default=None, help="default: proxyanchor,multisimilarity (structural: multisimilarity)"
    )
    parser.add_argument("--cub-root", type=Path, default=CUB50, help="CUB-200-2011 in its official layout (structural)")
    parser.add_argument("--profile", action="store_true", help="also time forward, loss, backward, optimiser apart")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="cpu: the process's CPU time (CPU only)"
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed block")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (on a shared 2-core machine more threads time the scheduler)",
    )
    args = parser.parse_args()
    losses = args.losses or METHODS[args.method].get("losses", "proxyanchor,multisimilarity")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} torch thread(s)"
    if args.clock == "cpu" and device.type == "cuda":
        parser.error("--clock cpu times CPU work: not a GPU's")
    clock = CLOCKS[args.clock]
    print(
        f"method {args.method}; device: {where}; load average at start {os.getloadavg()[0]:.1f}; "
        f"{args.rounds} interleaved rounds of {args.steps} steps; {args.clock} clock"
    )
    print(
        "| setting | loss | batch | variant | step (best) | ratio of best to plain | per-round ratio: median (range) |"
    )
    print("|---|---|---|---|---|---|---|")
    profiles = []
    for setting in args.settings.split(","):
        for loss in losses.split(","):
            r = bench(args.method, setting, loss, args.rounds, args.steps, device, args.cub_root, args.profile, clock)
            for row in r["rows"]:
                print(
                    f"| {r['preset']} ({r['backbone']}, {r['size']} px, {r['images']}) | {r['loss']} | {r['batch']} | {row['variant']} | "
                    f"{1000 * row['best_s']:.0f} ms | {row['ratio']:.3f}x | {row['median']:.3f}x ({row['lo']:.2f}-{row['hi']:.2f}x) |",
                    flush=True,
                )
                if row["parts"]:
                    profiles.append((r["preset"], r["loss"], row["variant"], row["parts"]))
    if profiles:
        print("\n| setting | loss | variant | forward | loss | backward | optimiser |\n|---|---|---|---|---|---|---|")
        for preset, loss, variant, p in profiles:
            cells = " | ".join(f"{1000 * p[k]:.0f} ms" for k in ("forward", "loss", "backward", "optimiser"))
            print(f"| {preset} | {loss} | {variant} | {cells} |")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
