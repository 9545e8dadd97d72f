r"""Part-correspondence accuracy of structural matching, measured with ground-truth keypoints.

DIML (Zhao et al., ICCV 2021) reads its transport plan ``T`` (rows: the ``N = g*g`` grid cells
of image x, columns: those of image y) as a map of which region of x corresponds to which region
of y. With part keypoints (CUB's 15 parts, or the parts of
:class:`glassmetric.data.synthetic.SyntheticParts`) this claim can be measured: for a same-class
pair, the cell of x that holds part p should send its mass to the cell of y that holds p.

The measure (:func:`part_correspondence`). For a part p visible in both images, with cells
``c_x(p)`` and ``c_y(p)``,

.. math::

    a_p = \frac{T[c_x(p), c_y(p)]}{\sum_j T[c_x(p), j]},

the share of the mass leaving p's cell in x that arrives at p's cell in y, i.e. the probability
that the plan, read as a conditional distribution ``P(y cell | x cell)``, maps p to p. The
score of a pair is the mean of ``a_p`` over the parts visible in both images. A uniform plan
gives exactly ``1/N``; a plan that maps each part's cell onto its counterpart's cell gives 1
when the parts occupy distinct cells (parts that share a cell of x but not of y cannot all
score 1: :func:`correspondence_upper_bound` gives the best any plan can do). A part whose cell
receives no mass at all in x (a zero row: with cross-correlation marginals, a cell whose
correlation with the other image is negative gets none) scores 0: the plan links it to
nothing.

Alternative aggregate (``top1``): 1 when the part's counterpart cell receives the largest share
of its row's mass, with ties shared (``1/t`` for a ``t``-way tie, so a uniform plan also scores
``1/N``); zero rows score 0.

Keypoints come in the raw image's pixels; :func:`keypoints_to_eval_frame` maps them through the
evaluation transform (``Resize`` of the shorter side then ``CenterCrop``, see
:func:`glassmetric.data.transforms.build_transforms`) and :func:`keypoint_cells` finds their
grid cells. Coordinates are continuous with pixel ``i`` covering ``[i, i + 1)`` (its centre at
``i + 0.5``), the convention of the synthetic data; keypoints annotated at pixel centres as
integers are then off by half a pixel, far below a cell.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from glassmetric.data.base import RetrievalDataset
from glassmetric.data.image_io import collate_readable
from glassmetric.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms, default_resize
from glassmetric.errors import ConfigError, DataError
from glassmetric.explain.keypoint_transfer import (
    cell_centre_grid,
    nearest_cell_transfer,
    oracle_cell_transfer,
    pck_hits,
    plan_transfer,
)
from glassmetric.models.heads import GROUPING
from glassmetric.models.spatial_head import SpatialGridHead
from glassmetric.similarity.ot_settings import OTSettings
from glassmetric.similarity.structural import MarginalKind, explain_pair

__all__ = [
    "CorrespondenceStats",
    "correspondence_upper_bound",
    "evaluate_correspondence",
    "keypoint_cells",
    "keypoints_to_eval_frame",
    "part_correspondence",
    "part_correspondence_batch",
    "resized_size",
    "sample_same_class_pairs",
]


# ---------------------------------------------------------------------------- geometry


def resized_size(image_size: tuple[int, int], resize: int) -> tuple[int, int]:
    """``(W, H)`` after torchvision's ``Resize(resize)`` (shorter side to ``resize``).

    Same arithmetic as torchvision: the longer side becomes ``int(resize * long / short)``.
    """
    w, h = (int(v) for v in image_size)
    if w <= 0 or h <= 0:
        raise ValueError(f"image_size must be positive (W, H), got {image_size}")
    if w <= h:
        return resize, int(resize * h / w)
    return int(resize * w / h), resize


def _crop_offset(size: int, crop: int) -> int:
    """Pixels removed before the crop along one side (negative: padding), as CenterCrop does."""
    if crop > size:  # torchvision pads (crop - size) // 2 on the left/top, then crops at 0
        return -((crop - size) // 2)
    return round((size - crop) / 2.0)


def keypoints_to_eval_frame(keypoints: np.ndarray, image_size: tuple[int, int], resize: int, crop: int) -> np.ndarray:
    """Map raw-image keypoints through ``Resize(resize)`` + ``CenterCrop(crop)``.

    Args:
        keypoints: ``(P, 3)`` x, y in the raw image's pixels and a visible flag (> 0 visible).
        image_size: the raw image's ``(W, H)`` (PIL's ``image.size``).
        resize: target of the shorter side; crop: side of the square centre crop.

    Returns:
        ``(P, 3)`` float32 x, y in the crop's pixels and the flag; a point that falls outside
        the crop, or was invisible, gets flag 0 and x = y = 0 (the :class:`Sample` convention).
    """
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.ndim != 2 or kp.shape[1] != 3:
        raise ValueError(f"keypoints must be (P, 3), got shape {kp.shape}")
    if resize < 1 or crop < 1:
        raise ValueError(f"resize and crop must be positive, got {resize} and {crop}")
    w, h = (int(v) for v in image_size)
    new_w, new_h = resized_size((w, h), resize)
    x = kp[:, 0] * (new_w / w) - _crop_offset(new_w, crop)
    y = kp[:, 1] * (new_h / h) - _crop_offset(new_h, crop)
    visible = (kp[:, 2] > 0) & (x >= 0) & (x < crop) & (y >= 0) & (y < crop)
    out = np.zeros(kp.shape, dtype=np.float32)
    out[visible, 0], out[visible, 1], out[visible, 2] = x[visible], y[visible], 1.0
    return out


def box_side_in_eval_frame(bbox, image_size: tuple[int, int], resize: int) -> float:
    """The larger side of ``bbox`` (x, y, w, h in the raw image) after ``Resize(resize)``; NaN without a box.

    The centre crop does not change lengths, so this is the PCK reference length in the crop.
    """
    if bbox is None:
        return math.nan
    w, h = (int(v) for v in image_size)
    new_w, new_h = resized_size((w, h), resize)
    return float(max(bbox[2] * new_w / w, bbox[3] * new_h / h))


def keypoint_cells(keypoints_in_crop: np.ndarray, crop: int, grid: int) -> np.ndarray:
    """``(P,)`` int64 row-major grid cell of each keypoint of a ``crop x crop`` image, -1 if invisible.

    Cell ``(r, c)`` (index ``r * grid + c``) covers ``[c, c + 1) * crop / grid`` in x and
    ``[r, r + 1) * crop / grid`` in y, the region a :class:`SpatialGridHead` cell summarises.
    """
    kp = np.asarray(keypoints_in_crop, dtype=np.float64)
    if kp.ndim != 2 or kp.shape[1] != 3:
        raise ValueError(f"keypoints must be (P, 3), got shape {kp.shape}")
    if grid < 1 or crop < 1:
        raise ValueError(f"grid and crop must be positive, got {grid} and {crop}")
    col = np.clip(np.floor(kp[:, 0] * grid / crop), 0, grid - 1).astype(np.int64)
    row = np.clip(np.floor(kp[:, 1] * grid / crop), 0, grid - 1).astype(np.int64)
    inside = (kp[:, 2] > 0) & (kp[:, 0] >= 0) & (kp[:, 0] < crop) & (kp[:, 1] >= 0) & (kp[:, 1] < crop)
    return np.where(inside, row * grid + col, -1)


# ---------------------------------------------------------------------------- the measure


class CorrespondenceStats:
    """Per-part results of :func:`part_correspondence_batch`; all ``(B, P)`` float64 tensors.

    ``share[b, p]`` is ``a_p`` of the module docstring, ``top1[b, p]`` the tie-shared arg-max
    hit and ``empty[b, p]`` 1.0 where p's row of the plan has no mass; all are NaN where p is
    not visible in both images of pair b (``common[b, p]`` False).
    """

    def __init__(self, share: Tensor, top1: Tensor, empty: Tensor, common: Tensor):
        self.share, self.top1, self.empty, self.common = share, top1, empty, common

    @property
    def n_parts(self) -> Tensor:
        """``(B,)`` int64: parts visible in both images of each pair."""
        return self.common.sum(1)

    def pair_scores(self, which: str = "share") -> Tensor:
        """``(B,)`` mean over each pair's common parts (NaN for a pair without any)."""
        return torch.nanmean(getattr(self, which), dim=1)


def part_correspondence_batch(plans: Tensor, cells_x: Tensor, cells_y: Tensor) -> CorrespondenceStats:
    """Part correspondence of a batch of plans (see the module docstring for the definition).

    Args:
        plans: ``(B, N, M)`` non-negative transport plans (rows: x's cells, columns: y's).
        cells_x, cells_y: ``(B, P)`` cell of each part in x / y (row-major), -1 if invisible.
    """
    plans = torch.as_tensor(plans)
    cells_x, cells_y = torch.as_tensor(cells_x), torch.as_tensor(cells_y)
    if plans.ndim != 3:
        raise ValueError(f"plans must be (B, N, M), got shape {tuple(plans.shape)}")
    b, n, m = plans.shape
    if cells_x.shape != cells_y.shape or cells_x.ndim != 2 or cells_x.shape[0] != b:
        raise ValueError(
            f"cells_x and cells_y must both be (B={b}, P), got {tuple(cells_x.shape)} and {tuple(cells_y.shape)}"
        )
    if cells_x.numel() and (
        int(cells_x.max()) >= n or int(cells_y.max()) >= m or int(cells_x.min()) < -1 or int(cells_y.min()) < -1
    ):
        raise ValueError(f"cells must be -1 or lie in [0, {n}) for x and [0, {m}) for y")
    plans = plans.double()
    cells_x, cells_y = cells_x.long().to(plans.device), cells_y.long().to(plans.device)
    common = (cells_x >= 0) & (cells_y >= 0)
    cx, cy = cells_x.clamp(min=0), cells_y.clamp(min=0)
    rows = plans.gather(1, cx[:, :, None].expand(b, cx.shape[1], m))  # (B, P, M) p's row of T
    mass = rows.sum(-1)
    target = rows.gather(2, cy[:, :, None]).squeeze(2)
    empty = mass <= 0
    share = torch.where(empty, torch.zeros_like(mass), target / torch.where(empty, 1.0, mass))
    row_max = rows.amax(-1)
    ties = (rows == row_max[..., None]).sum(-1).double()
    top1 = torch.where(~empty & (target == row_max), 1.0 / ties, torch.zeros_like(mass))
    nan = torch.full_like(share, math.nan)
    return CorrespondenceStats(
        share=torch.where(common, share, nan),
        top1=torch.where(common, top1, nan),
        empty=torch.where(common, empty.double(), nan),
        common=common,
    )


def part_correspondence(plan: Tensor, cells_x: Sequence[int], cells_y: Sequence[int]) -> tuple[float, int]:
    r"""Part correspondence of one transport plan: ``(score, n_parts)``.

    ``score`` is the mean over the ``n_parts`` parts visible in both images (cell >= 0 in both
    ``cells_x`` and ``cells_y``) of

    .. math:: a_p = T[c_x(p), c_y(p)] \,/\, \textstyle\sum_j T[c_x(p), j],

    the share of the mass leaving the cell of x that holds part p that arrives at the cell of y
    holding p (0 when that row of ``T`` has no mass). It is ``1/N`` for a uniform plan with
    ``N`` cells and 1 for a perfect part-to-part plan when the parts occupy distinct cells.
    ``score`` is NaN when ``n_parts`` is 0.

    Args:
        plan: ``(N, M)`` transport plan, rows x's cells, columns y's cells.
        cells_x, cells_y: ``(P,)`` cell of each part (from :func:`keypoint_cells`), -1 if
            invisible.
    """
    plan = torch.as_tensor(plan)
    if plan.ndim != 2:
        raise ValueError(f"plan must be (N, M), got shape {tuple(plan.shape)}")
    stats = part_correspondence_batch(
        plan[None], torch.as_tensor(np.asarray(cells_x))[None], torch.as_tensor(np.asarray(cells_y))[None]
    )
    return float(stats.pair_scores()[0]), int(stats.n_parts[0])


def correspondence_upper_bound(cells_x: np.ndarray, cells_y: np.ndarray) -> np.ndarray:
    """``(B,)`` the best pair score any plan can reach given the parts' cells (NaN: no parts).

    Parts sharing a cell of x share one row of the plan: the row can send all its mass to one
    cell of y, so at most the largest group of them with a common target scores 1 and the rest
    0. Equal to 1 when the common parts occupy distinct cells of x.
    """
    cells_x, cells_y = np.atleast_2d(cells_x), np.atleast_2d(cells_y)
    out = np.full(len(cells_x), np.nan)
    for b, (cx, cy) in enumerate(zip(cells_x, cells_y, strict=True)):
        keep = (cx >= 0) & (cy >= 0)
        if keep.any():
            best: dict[int, int] = {}  # x cell -> most parts it holds with one common y cell
            for (c, _), k in Counter(zip(cx[keep].tolist(), cy[keep].tolist(), strict=True)).items():
                best[c] = max(best.get(c, 0), k)
            out[b] = sum(best.values()) / keep.sum()
    return out


# ---------------------------------------------------------------------------- evaluation


def sample_same_class_pairs(labels: np.ndarray, n_pairs: int, seed: int = 0) -> np.ndarray:
    """``(n, 2)`` int64 distinct unordered same-class pairs ``(i, j)``, ``i < j``, drawn uniformly.

    Without replacement from all such pairs; all of them (in a seeded random order) when there
    are at most ``n_pairs``.
    """
    labels = np.asarray(labels)
    if n_pairs < 0:
        raise ValueError(f"n_pairs must be >= 0, got {n_pairs}")
    order = np.argsort(labels, kind="stable")
    _, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    per_class = sizes.astype(np.int64) * (sizes - 1) // 2
    total = int(per_class.sum())
    rng = np.random.default_rng(seed)
    flat = rng.permutation(total) if total <= n_pairs else rng.choice(total, size=n_pairs, replace=False)
    flat = np.asarray(flat, dtype=np.int64)
    ends = np.cumsum(per_class)
    cls = np.searchsorted(ends, flat, side="right")
    t = flat - (ends[cls] - per_class[cls])  # rank of the pair inside its class
    # unrank t -> (a, b), a < b, with t = b (b - 1) / 2 + a
    b = np.floor((1 + np.sqrt(1 + 8 * t.astype(np.float64))) / 2).astype(np.int64)
    b -= (b * (b - 1) // 2 > t).astype(np.int64)
    b += ((b + 1) * b // 2 <= t).astype(np.int64)
    a = t - b * (b - 1) // 2
    base = starts[cls]
    return np.stack([order[base + a], order[base + b]], axis=1).astype(np.int64)


class _EvalImages(Dataset):
    """Images ``indices`` of ``dataset`` through the eval transform, with their keypoints in the crop."""

    def __init__(self, dataset: RetrievalDataset, indices: np.ndarray, transform, resize: int, crop: int):
        self.dataset, self.indices, self.transform = dataset, indices, transform
        self.resize, self.crop = resize, crop

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict | None:
        sample = self.dataset.load_readable(int(self.indices[i]))
        if sample is None:  # unreadable, left out under data.on_bad_image: skip
            return None
        if sample.keypoints is None:
            raise ValueError(
                f"{type(self.dataset).__name__}.load({int(self.indices[i])}) gives no keypoints; "
                "part correspondence needs a data set with part annotations"
            )
        kp = keypoints_to_eval_frame(sample.keypoints, sample.image.size, self.resize, self.crop)
        return {
            "image": self.transform(sample.image),
            "keypoints": torch.from_numpy(kp),
            "box_side": box_side_in_eval_frame(sample.bbox, sample.image.size, self.resize),
            "position": i,
        }

    def loader(self, batch_size: int, num_workers: int) -> DataLoader:
        """In order; a batch holds the images that were read, their ``position`` in ``indices``."""
        return DataLoader(
            self, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_readable
        )


@torch.inference_mode()
def _embed(model, loader, grid: int | None, device) -> tuple[Tensor, Tensor, Tensor, Tensor, int, Tensor]:
    """(global (n, D), local (n, N, D), keypoints (n, P, 3), box sides (n,), grid, positions (n,))
    of the loader's images that were read (``positions``: their place in the loader's ``indices``)."""
    modes = {mod: mod.training for mod in model.modules()}
    model.eval().to(device)
    spatial = None
    glob, loc, kps, sides, read = [], [], [], [], []
    try:
        for batch in loader:
            if "image" not in batch:  # every image of the batch was skipped
                continue
            read.append(batch["position"])
            out = model(batch["image"].to(device))
            local = out.local
            if local is None:  # training-free spatial head on the model's own global head
                if spatial is None and GROUPING in getattr(model, "extra_heads", {}):  # its global head is untrained
                    raise ConfigError(
                        "structural matching on a model.groups checkpoint needs its own trained spatial head: "
                        "train with model.spatial_grid=4 model.spatial_head=own loss.similarity=structural"
                    )
                if spatial is None:
                    spatial = SpatialGridHead.sharing(model.head, grid or 4)
                local = spatial(out.feature_map, out.pooled, out)["local"]
            glob.append(out.embedding.float())
            loc.append(local.float())
            kps.append(batch["keypoints"])
            sides.append(batch["box_side"].double())
    finally:
        for mod, training in modes.items():
            mod.training = training
    if not loc:
        raise DataError("part correspondence: no image could be read (all skipped under data.on_bad_image: skip)")
    local = torch.cat(loc)
    g = math.isqrt(local.shape[1])
    if g * g != local.shape[1]:
        raise ValueError(f"the model's local embeddings have {local.shape[1]} cells, not a square grid")
    if grid is not None and g != grid:
        raise ValueError(f"the model's spatial head has a {g} x {g} grid, but grid={grid} was asked")
    return torch.cat(glob), local, torch.cat(kps), torch.cat(sides), g, torch.cat(read)


def evaluate_correspondence(
    model: torch.nn.Module,
    dataset: RetrievalDataset,
    *,
    pairs: int = 500,
    grid: int | None = None,
    crop: int = 224,
    resize: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    pair_batch: int = 1024,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    epsilon: float = 0.05,
    iters: int = 100,
    tol: float | None = None,
    marginals: MarginalKind = "cross_correlation",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    pck_alpha: float = 0.1,
    settings: OTSettings | None = None,
) -> dict:
    """How well the model's transport plans link corresponding parts of same-class pairs.

    Samples ``pairs`` distinct same-class pairs (seeded, :func:`sample_same_class_pairs`),
    embeds their images with the evaluation transform (``Resize(resize)`` + ``CenterCrop(crop)``,
    ``resize`` defaulting to ``round(crop * 256 / 224)`` as in
    :func:`glassmetric.data.transforms.build_transforms`), maps their keypoints (``load(i)``
    must give them) to grid cells and scores three plans per pair with
    :func:`part_correspondence_batch`:

    * ``learned``: the DIML plan (``marginals``, cross-correlation by default);
    * ``uniform_marginals``: the optimal plan of the same cost with uniform marginals;
    * ``uniform``: the product ``mu nu^T`` of uniform marginals (chance level, ``1/N``).

    The OT settings are ``epsilon, iters, tol, marginals``, or one ``settings``
    (:class:`~glassmetric.similarity.ot_settings.OTSettings`, e.g. ``OTSettings.from_config(cfg)``),
    which then replaces those four.

    The local embeddings come from the model's own spatial head (any extra head that sets
    ``local``), or else from a training-free ``SpatialGridHead.sharing(model.head, grid or 4)``
    applied outside the model (the model is not changed).

    Returns:
        A dict with, for each plan name ``X`` in (``learned``, ``uniform_marginals``,
        ``uniform``): ``X`` the headline score (mean over pairs of the pair's mean ``a_p`` over
        its common parts; pairs without a common visible part are left out) and ``X_top1``
        (the same with the arg-max hit); ``learned_empty`` (share of part instances whose
        learned row has no mass); ``upper_bound`` (mean over pairs of
        :func:`correspondence_upper_bound`: what a perfect plan could reach given the cell
        collisions); ``per_part`` ({part name: mean learned ``a_p`` over its instances});
        ``n_pairs`` (pairs scored), ``n_pairs_sampled``, ``n_pairs_unreadable`` (left out: an image
        skipped under ``data.on_bad_image: skip``), ``n_parts`` (part instances scored),
        ``grid`` and ``n_cells``; ``part_mass`` ({part name: mean share of SS contributed by the
        cell of x holding the part}, against ``1 / n_cells`` for an even spread).
        Where every image has a bounding box, keypoint transfer
        (:mod:`glassmetric.explain.keypoint_transfer`) at PCK@``pck_alpha``: ``pck_X`` for the
        three plans, ``pck_nearest`` (arg-max of the cell similarities) and ``pck_oracle_cell``
        (the centre of the true target cell: the grid's limit), each a mean over pairs of the
        pair's mean hit; ``per_part_pck_X`` for ``learned``, ``nearest`` and ``oracle_cell``.
    """
    if settings is not None:
        epsilon, iters, tol, marginals = settings.epsilon, settings.iters, settings.tol, settings.marginals
    resize = default_resize(crop) if resize is None else resize
    transform = build_transforms(False, crop, resize, mean=mean, std=std)
    pair_idx = sample_same_class_pairs(dataset.labels, pairs, seed)
    if len(pair_idx) == 0:
        raise ValueError("the data set has no same-class pair")
    images, image_of = np.unique(pair_idx, return_inverse=True)
    inverse = torch.from_numpy(image_of.reshape(pair_idx.shape))
    loader = _EvalImages(dataset, images, transform, resize, crop).loader(batch_size, num_workers)
    glob, local, kps, box_sides, g, read = _embed(model, loader, grid, device)
    cells = torch.from_numpy(np.stack([keypoint_cells(k.numpy(), crop, g) for k in kps]))
    n_cells = g * g

    # rows of the images that were read; a pair with a skipped (unreadable) image is left out
    row = torch.full((len(images),), -1, dtype=torch.long)
    row[read] = torch.arange(len(read))
    ia, ib = row[inverse[:, 0]], row[inverse[:, 1]]
    readable = (ia >= 0) & (ib >= 0)
    ia, ib = ia[readable], ib[readable]
    if len(ia) == 0:
        raise DataError(f"part correspondence: each of the {len(pair_idx)} sampled pairs has an unreadable image")
    names = ("learned", "uniform_marginals", "uniform")
    parts: dict[str, list[CorrespondenceStats]] = {name: [] for name in names}
    with_pck = bool(torch.isfinite(box_sides).all())
    pck: dict[str, list[Tensor]] = {name: [] for name in (*names, "nearest", "oracle_cell")}
    mass: list[Tensor] = []
    centres = cell_centre_grid(g, crop)
    for start in range(0, len(ia), pair_batch):
        a, b = ia[start : start + pair_batch], ib[start : start + pair_batch]
        xl, yl = local[a].to(device), local[b].to(device)
        xg, yg = glob[a].to(device), glob[b].to(device)
        cx, cy = cells[a], cells[b]
        tensors: dict[str, Any] = {"x_local": xl, "y_local": yl, "x_global": xg, "y_global": yg}
        learned = explain_pair(**tensors, epsilon=epsilon, iters=iters, tol=tol, marginals=marginals)
        plans = {
            "learned": learned.T,
            "uniform_marginals": explain_pair(**tensors, epsilon=epsilon, iters=iters, tol=tol, marginals="uniform").T,
            "uniform": torch.full((len(a), n_cells, n_cells), 1.0 / n_cells**2, dtype=torch.float64),
        }
        for name, plan in plans.items():
            parts[name].append(part_correspondence_batch(plan.cpu(), cx, cy))
        common = parts["learned"][-1].common  # parts visible in both images
        if with_pck:
            predictions = {name: plan_transfer(plan.cpu(), cx, centres) for name, plan in plans.items()}
            predictions["nearest"] = nearest_cell_transfer(learned.S.cpu(), cx, centres)
            predictions["oracle_cell"] = oracle_cell_transfer(cy, centres)
            for name, (pred, ok) in predictions.items():
                pck[name].append(pck_hits(pred, ok, kps[b], box_sides[b], common, pck_alpha))
        # each part's share of SS: what the cell of x holding it contributes, sum_j T_cj S_cj / SS
        ss = learned.ss.cpu().double()[:, None]
        share_x = learned.region_contribution_x.cpu().double() / torch.where(ss.abs() < 1e-12, math.nan, ss)
        cell_share = share_x.gather(1, cx.clamp(min=0))
        mass.append(torch.where(common, cell_share, torch.full_like(cell_share, math.nan)))

    def cat(name: str, field: str) -> Tensor:
        return torch.cat([getattr(s, field) for s in parts[name]])

    common = cat("learned", "common")
    scored = common.any(1)
    out: dict = {}
    for name in names:
        out[name] = _mean(torch.nanmean(cat(name, "share")[scored], 1))
        out[f"{name}_top1"] = _mean(torch.nanmean(cat(name, "top1")[scored], 1))
    out["learned_empty"] = _mean(cat("learned", "empty")[common])
    out["upper_bound"] = (
        float(np.nanmean(correspondence_upper_bound(cells[ia][scored].numpy(), cells[ib][scored].numpy())))
        if bool(scored.any())
        else math.nan
    )
    share = cat("learned", "share")
    part_names = list(getattr(dataset, "part_names", ())) or [str(p) for p in range(share.shape[1])]
    out["per_part"] = {name: _mean(share[common[:, p], p]) for p, name in enumerate(part_names[: share.shape[1]])}
    if with_pck:
        for name, per_batch in pck.items():
            hits = torch.cat(per_batch)
            out[f"pck_{name}"] = _mean(torch.nanmean(hits[scored], 1))
            if name in ("learned", "nearest", "oracle_cell"):
                out[f"per_part_pck_{name}"] = {
                    part: _mean(hits[common[:, p], p]) for p, part in enumerate(part_names[: hits.shape[1]])
                }
        out["pck_alpha"] = pck_alpha
    mass_share = torch.cat(mass)
    out["part_mass"] = {
        part: _mean(mass_share[common[:, p], p]) for p, part in enumerate(part_names[: mass_share.shape[1]])
    }
    out.update(
        n_pairs=int(scored.sum()),
        n_pairs_sampled=len(pair_idx),
        n_pairs_unreadable=int((~readable).sum()),
        n_parts=int(common.sum()),
        grid=g,
        n_cells=n_cells,
    )
    return out


def _mean(values: Tensor) -> float:
    return float(values.mean()) if values.numel() else math.nan
