r"""How distinct the attention groups of a DGML model are, measured with ground-truth part keypoints.

The paper's claim is that each group attends to its own part of the object. Two measurements,
on images with part keypoints (CUB's 15 parts; the 6 parts of the embedded synthetic data):

* Overlap (:func:`top_region_masks`, :func:`pairwise_iou`). The top region of group i on an
  image is the ``ceil(fraction * h * w)`` positions of the feature map with the largest
  attention (ties: the lower position index first). For every pair of groups, the IoU of their
  top regions, averaged over images; 0 means the groups look at disjoint places, 1 at the same
  ones. The reference is :func:`chance_iou`, the expected IoU of two independent uniformly
  random regions of that size.
* Peak-to-part (:func:`attention_peaks`, :func:`nearest_parts`, :func:`part_assignment`). The
  peak of a group is the centre of its most attended position (the feature map's cells tile
  the evaluation crop); its part is the visible ground-truth keypoint nearest to the peak
  (Euclidean, in crop pixels). Per group: how often each part is the nearest, the most frequent
  one, and its share. Distinct groups peak on distinct parts. Since parts sit at typical places
  in an image, a group that always peaks at the same position also "finds" a part; the share
  of images in which a group peaks at its most frequent position (``fixed_position``) tells the
  two apart: near 1, the group is a fixed region of the image rather than a part detector.
* Spread (:func:`attention_spread`). How many positions a group attends to: the perplexity
  ``exp(H(a_i))`` of its attention distribution (``H`` in nats), from 1 (one position) to
  ``h * w`` (uniform, i.e. average pooling). A peak on a part means little when the group
  spreads over most of the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from glassmetric.data.base import RetrievalDataset
from glassmetric.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms, default_resize
from glassmetric.errors import ConfigError, DataError
from glassmetric.explain.correspondence import _EvalImages
from glassmetric.models.heads import GROUPING

__all__ = [
    "attention_peaks",
    "attention_spread",
    "chance_iou",
    "evaluate_group_parts",
    "group_part_mutual_information",
    "nearest_parts",
    "pairwise_iou",
    "part_assignment",
    "top_region_masks",
]


def top_region_masks(attention: Tensor, fraction: float = 0.1) -> Tensor:
    """``(N, k, h, w)`` attention -> ``(N, k, h*w)`` bool: each group's top ``ceil(fraction*h*w)`` positions."""
    if attention.ndim != 4:
        raise ValueError(f"attention must be (N, k, h, w), got shape {tuple(attention.shape)}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat = attention.flatten(2)
    n_top = max(1, math.ceil(fraction * flat.shape[-1] - 1e-9))
    # stable order: the largest first, ties by position index
    order = torch.sort(-flat, dim=-1, stable=True).indices[..., :n_top]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, order, True)


def pairwise_iou(masks: Tensor) -> Tensor:
    """``(N, k, P)`` bool regions -> ``(N, k, k)`` IoU of every pair of groups (1 on the diagonal)."""
    m = masks.double()
    inter = m @ m.transpose(1, 2)
    size = m.sum(-1)
    union = size[:, :, None] + size[:, None, :] - inter
    return inter / union.clamp(min=1.0)


def chance_iou(positions: int, n_top: int) -> float:
    """Expected IoU of two independent uniformly random ``n_top``-subsets of ``positions`` positions.

    The intersection X is hypergeometric: ``P(X = x) = C(n, x) C(P - n, n - x) / C(P, n)``;
    the IoU is ``X / (2n - X)``.
    """
    total = math.comb(positions, n_top)
    return sum(
        math.comb(n_top, x) * math.comb(positions - n_top, n_top - x) / total * x / (2 * n_top - x)
        for x in range(0, n_top + 1)
    )


def attention_spread(attention: Tensor) -> Tensor:
    """``(N, k, h, w)`` attention (each map sums to 1) -> ``(N, k)``: the effective number of
    attended positions, ``exp(-sum_p a_p log a_p)`` (0 log 0 = 0)."""
    if attention.ndim != 4:
        raise ValueError(f"attention must be (N, k, h, w), got shape {tuple(attention.shape)}")
    a = attention.double().flatten(2)
    return torch.exp(-torch.special.xlogy(a, a).sum(-1))


def attention_peaks(attention: Tensor, crop: int) -> Tensor:
    """``(N, k, h, w)`` -> ``(N, k, 2)`` float64 ``(x, y)`` of the most attended cell's centre, in
    pixels of the ``crop x crop`` evaluation image (cell ``(r, c)`` covers ``[c, c+1) * crop / w``
    by ``[r, r+1) * crop / h``; ties: the first position in row-major order)."""
    _n, _k, h, w = attention.shape
    idx = attention.flatten(2).argmax(-1)
    r, c = idx // w, idx % w
    return torch.stack([(c.double() + 0.5) * crop / w, (r.double() + 0.5) * crop / h], dim=-1)


def nearest_parts(peaks: Tensor, keypoints: Tensor) -> Tensor:
    """``(N, k, 2)`` peaks and ``(N, P, 3)`` keypoints (x, y, visible) -> ``(N, k)`` int64 index of
    the nearest visible part (ties: the lower part index), -1 for an image with none visible."""
    kp = keypoints.double()
    d = torch.cdist(peaks.double(), kp[..., :2])  # (N, k, P)
    visible = kp[..., 2] > 0
    d = torch.where(visible[:, None, :], d, torch.full_like(d, math.inf))
    nearest = d.argmin(-1)
    return torch.where(visible.any(-1)[:, None], nearest, torch.full_like(nearest, -1))


def part_assignment(nearest: Tensor, n_parts: int) -> Tensor:
    """``(N, k)`` nearest part per image and group -> ``(k, n_parts)`` int64 counts (-1 not counted)."""
    k = nearest.shape[1]
    counts = torch.zeros(k, n_parts, dtype=torch.long)
    valid = nearest >= 0
    group = torch.arange(k).expand_as(nearest)
    counts.index_put_((group[valid], nearest[valid]), torch.ones(int(valid.sum()), dtype=torch.long), accumulate=True)
    return counts


def group_part_mutual_information(counts: Tensor) -> float:
    r"""Mutual information (nats) between group and nearest part, from the ``(k, P)`` counts of
    :func:`part_assignment`: each (image, group) is one draw of ``(g, p)``, and

    .. math:: I(G; P) = \sum_{g,p} P(g,p) \log \frac{P(g,p)}{P(g) P(p)} .

    0 when every group finds the parts in the same proportions; ``log k`` at most (groups that
    each always find their own part). The plug-in estimate is biased upwards on few images:
    compare it with that of random maps on the same images (``mi_random`` of
    :func:`evaluate_group_parts`).
    """
    joint = counts.double()
    total = joint.sum()
    if total <= 0:
        return math.nan
    joint = joint / total
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * (joint[nz] / outer[nz]).log()).sum())


@torch.inference_mode()
def evaluate_group_parts(
    model: torch.nn.Module,
    dataset: RetrievalDataset,
    *,
    images: int = 500,
    fraction: float = 0.1,
    crop: int = 224,
    resize: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    random_maps: int = 10,
) -> dict:
    """Group distinctness of a grouping model on ``images`` images of ``dataset`` (seeded sample).

    Returns a dict: ``iou`` (mean over images and pairs of groups of the top-region IoU),
    ``iou_pairs`` ({"1-2": mean IoU, ...}), ``iou_chance`` (:func:`chance_iou`), ``fraction``,
    ``n_top`` and ``positions`` (h*w); ``groups``: per group (1-based), ``part`` (the most
    frequent nearest part), ``share`` (how often), ``counts`` ({part: count}), ``fixed_position``
    (share of the images whose peak is at the group's most frequent position), ``spread`` (mean
    :func:`attention_spread`: positions attended, of ``positions``); ``distinct_parts``
    (how many different parts the groups' most frequent parts are); ``n_images``; ``mi``
    (:func:`group_part_mutual_information`, nats) and ``mi_random`` (mean, over
    ``random_maps`` seeded draws, of the same for i.i.d. uniform random attention maps of the
    same shape on the same images: the estimate's floor).
    """
    if GROUPING not in getattr(model, "extra_heads", {}):
        raise ConfigError("--groups-parts: the checkpoint has no attention groups (train with model.groups > 0)")
    resize = default_resize(crop) if resize is None else resize
    transform = build_transforms(False, crop, resize, mean=mean, std=std)
    n = min(int(images), len(dataset))
    if n < 1:
        raise ValueError("--groups-parts: the data set has no image")
    picked = np.sort(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False))
    loader = _EvalImages(dataset, picked, transform, resize, crop).loader(batch_size, num_workers)
    was_training = model.training
    model.eval().to(device)
    attention, keypoints = [], []
    try:
        for batch in loader:
            if "image" not in batch:  # all skipped under data.on_bad_image: skip
                continue
            attention.append(model(batch["image"].to(device)).attention.float().cpu())
            keypoints.append(batch["keypoints"])
    finally:
        model.train(was_training)
    if not attention:
        raise DataError("--groups-parts: no image could be read (all skipped under data.on_bad_image: skip)")
    att, kps = torch.cat(attention), torch.cat(keypoints)
    _, k, h, w = att.shape
    masks = top_region_masks(att, fraction)
    iou = pairwise_iou(masks).mean(0)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    names = list(getattr(dataset, "part_names", ())) or [str(p) for p in range(kps.shape[1])]
    counts = part_assignment(nearest_parts(attention_peaks(att, crop), kps), kps.shape[1])
    peak_cells = att.flatten(2).argmax(-1)  # (N, k)
    spread = attention_spread(att).mean(0)  # (k,)
    groups = {}
    for i in range(k):
        total = int(counts[i].sum())
        best = int(counts[i].argmax())
        groups[str(i + 1)] = {
            "part": names[best],
            "share": counts[i, best].item() / total if total else math.nan,
            "counts": {names[p]: int(c) for p, c in enumerate(counts[i].tolist())},
            "fixed_position": torch.bincount(peak_cells[:, i], minlength=h * w).max().item() / len(att),
            "spread": spread[i].item(),
        }
    n_top = int(masks[0, 0].sum())
    gen = torch.Generator().manual_seed(seed)
    mi_random = [
        group_part_mutual_information(
            part_assignment(
                nearest_parts(attention_peaks(torch.rand(att.shape, generator=gen), crop), kps), kps.shape[1]
            )
        )
        for _ in range(random_maps)
    ]
    return {
        "mi": group_part_mutual_information(counts),
        "mi_random": float(np.mean(mi_random)) if mi_random else math.nan,
        "iou": float(np.mean([iou[i, j].item() for i, j in pairs])) if pairs else math.nan,
        "iou_pairs": {f"{i + 1}-{j + 1}": iou[i, j].item() for i, j in pairs},
        "iou_chance": chance_iou(h * w, n_top),
        "fraction": fraction,
        "n_top": n_top,
        "positions": h * w,
        "groups": groups,
        "distinct_parts": len({g["part"] for g in groups.values()}),
        "n_images": len(att),
    }
