"""Part-correspondence accuracy: the measure against loops, the keypoint geometry against the
real torchvision eval transform, and an end-to-end run on tiny synthetic birds."""

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from glassmetric.data.synthetic import SyntheticParts
from glassmetric.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms
from glassmetric.explain import (
    correspondence_upper_bound,
    evaluate_correspondence,
    keypoint_cells,
    keypoints_to_eval_frame,
    part_correspondence,
    part_correspondence_batch,
    sample_same_class_pairs,
)
from glassmetric.models import build_model
from glassmetric.models.spatial_head import SpatialGridHead

# ----------------------------------------------------------------------------- the measure


def test_uniform_plan_gives_one_over_n():
    for n in (16, 9, 4):
        plan = torch.full((n, n), 1.0 / n**2)
        cells_x, cells_y = [0, n - 1, 2, -1, 1], [3, 0, -1, 2, 1]
        score, parts = part_correspondence(plan, cells_x, cells_y)
        assert parts == 3
        if n in (16, 4):  # powers of two: exact in binary
            assert score == 1.0 / n
        assert score == pytest.approx(1.0 / n, abs=1e-15)
        stats = part_correspondence_batch(plan[None], torch.tensor([cells_x]), torch.tensor([cells_y]))
        assert float(stats.pair_scores("top1")[0]) == pytest.approx(1.0 / n)  # ties shared


def test_part_to_part_plans_give_one():
    n = 16
    cells_x = [0, 5, 10, 15, -1]
    score, parts = part_correspondence(torch.eye(n) / n, cells_x, cells_x)
    assert (score, parts) == (1.0, 4)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    plan = torch.zeros(n, n)
    plan[torch.arange(n), perm] = 1.0 / n  # cell i of x -> cell perm[i] of y
    cells_y = [int(perm[c]) if c >= 0 else -1 for c in cells_x]
    assert part_correspondence(plan, cells_x, cells_y) == (1.0, 4)
    # the wrong part-to-part map scores 0
    assert part_correspondence(plan, cells_x, [*cells_x[::-1][1:], -1])[0] == 0.0


def brute_pair_score(plan, cx, cy):
    shares = []
    for p in range(len(cx)):
        if cx[p] < 0 or cy[p] < 0:
            continue
        row = [float(plan[cx[p], j]) for j in range(plan.shape[1])]
        shares.append(row[cy[p]] / sum(row) if sum(row) > 0 else 0.0)
    return (sum(shares) / len(shares) if shares else math.nan), len(shares)


def test_batch_against_loops():
    rng = np.random.default_rng(0)
    b, n, m, p = 12, 9, 7, 5
    plans = torch.from_numpy(rng.random((b, n, m)) ** 4)
    plans[0, 3] = 0.0  # a row without mass
    cx = torch.from_numpy(rng.integers(-1, n, (b, p)))
    cy = torch.from_numpy(rng.integers(-1, m, (b, p)))
    cx[0, 0], cy[0, 0] = 3, 2
    cx[1], cy[1, 0] = -1, 0  # no common part: NaN
    stats = part_correspondence_batch(plans, cx, cy)
    pair = stats.pair_scores()
    for i in range(b):
        ref, parts = brute_pair_score(plans[i], cx[i].tolist(), cy[i].tolist())
        single, single_parts = part_correspondence(plans[i], cx[i].tolist(), cy[i].tolist())
        assert parts == single_parts == int(stats.n_parts[i])
        if parts == 0:
            assert math.isnan(ref) and math.isnan(single) and math.isnan(float(pair[i]))
        else:
            assert single == pytest.approx(ref, rel=1e-12) and float(pair[i]) == pytest.approx(ref, rel=1e-12)
    assert stats.share[0, 0] == 0.0 and stats.empty[0, 0] == 1.0 and stats.top1[0, 0] == 0.0
    # top1: 1 exactly where the target holds the row's (unique) maximum
    for i, q in itertools.product(range(b), range(p)):
        if stats.common[i, q]:
            row = plans[i, cx[i, q]]
            expect = float(row.argmax() == cy[i, q]) if row.sum() > 0 else 0.0
            assert float(stats.top1[i, q]) == expect
    with pytest.raises(ValueError):
        part_correspondence_batch(plans, cx, cy[:, :2])
    with pytest.raises(ValueError):
        part_correspondence(plans[0], [n], [0])


def test_upper_bound():
    # parts 0 and 1 share x cell 4 but go to different y cells: at most one of them scores 1
    bound = correspondence_upper_bound(np.array([4, 4, 7, -1]), np.array([1, 2, 3, 0]))
    assert bound[0] == pytest.approx(2 / 3)
    assert correspondence_upper_bound(np.array([4, 4, 7]), np.array([1, 1, 3]))[0] == 1.0
    assert math.isnan(correspondence_upper_bound(np.array([-1]), np.array([1]))[0])


# ----------------------------------------------------------------------------- geometry


def dot_centre_after_transform(size, dot_xy, resize, crop, side=4):
    """Draw a side x side white square whose centre is dot_xy, transform, find its centroid."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    x0, y0 = int(dot_xy[0] - side / 2), int(dot_xy[1] - side / 2)
    arr[y0 : y0 + side, x0 : x0 + side] = 255
    out = build_transforms(False, crop, resize)(Image.fromarray(arr))
    inten = (out[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]).clamp(min=0).double()
    ys, xs = torch.meshgrid(torch.arange(crop) + 0.5, torch.arange(crop) + 0.5, indexing="ij")
    mass = inten.sum()
    return float((inten * xs).sum() / mass), float((inten * ys).sum() / mass), float(mass)


@pytest.mark.parametrize(
    "size, resize, crop, dot",
    [
        ((150, 97), 80, 64, (60.0, 40.0)),  # landscape, downscaled
        ((97, 150), 80, 64, (30.0, 100.0)),  # portrait
        ((123, 123), 73, 64, (20.0, 90.0)),  # square, odd margins
        ((40, 61), 72, 64, (12.0, 34.0)),  # upscaled
    ],
)
def test_keypoints_follow_the_real_eval_transform(size, resize, crop, dot):
    kp = np.array([[dot[0], dot[1], 1.0]], np.float32)
    mapped = keypoints_to_eval_frame(kp, size, resize, crop)
    x, y, _ = dot_centre_after_transform(size, dot, resize, crop)
    assert mapped[0, 2] == 1.0
    assert abs(mapped[0, 0] - x) < 0.1 and abs(mapped[0, 1] - y) < 0.1


def test_keypoints_outside_the_crop_become_invisible():
    size, resize, crop = (200, 100), 64, 64  # resized to 128 x 64: 32 px cut on each side
    kp = np.array([[10.0, 50.0, 1.0], [190.0, 50.0, 1.0], [100.0, 50.0, 1.0], [100.0, 50.0, 0.0]])
    out = keypoints_to_eval_frame(kp, size, resize, crop)
    assert out[:, 2].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert (out[[0, 1, 3], :2] == 0).all()
    assert out[2, :2].tolist() == [32.0, 32.0]
    # the dot really is cut away by the transform
    assert dot_centre_after_transform(size, (10.0, 50.0), resize, crop)[2] == 0.0


def test_keypoints_when_center_crop_pads():
    # a crop larger than the resized image: torchvision pads, the mapping must follow
    size, resize, crop = (60, 90), 40, 48  # resized to 40 x 60, padded to 48 in x
    arr = np.zeros((90, 60, 3), np.uint8)
    arr[18:22, 28:32] = 255  # centre (30, 20)
    geometry = T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor()])
    out = geometry(Image.fromarray(arr))[0].double()
    ys, xs = torch.meshgrid(torch.arange(crop) + 0.5, torch.arange(crop) + 0.5, indexing="ij")
    x, y = float((out * xs).sum() / out.sum()), float((out * ys).sum() / out.sum())
    mapped = keypoints_to_eval_frame(np.array([[30.0, 20.0, 1.0]]), size, resize, crop)
    assert abs(mapped[0, 0] - x) < 0.2 and abs(mapped[0, 1] - y) < 0.2


def test_keypoint_cells():
    kp = np.array([[0, 0, 1], [63.9, 0, 1], [0, 16, 1], [63.99, 63.99, 1], [20, 40, 0], [31.9, 32, 1]], np.float32)
    assert keypoint_cells(kp, 64, 4).tolist() == [0, 3, 4, 15, -1, 9]
    assert keypoint_cells(kp, 64, 1).tolist() == [0, 0, 0, 0, -1, 0]


def test_sample_same_class_pairs():
    labels = np.array([3, 1, 3, 2, 1, 3, 9])
    every = sample_same_class_pairs(labels, 100, seed=0)
    expected = {(0, 2), (0, 5), (2, 5), (1, 4)}
    assert {tuple(p) for p in every} == expected and len(every) == 4
    some = sample_same_class_pairs(labels, 2, seed=1)
    assert len(some) == 2 and len({tuple(p) for p in some}) == 2
    assert {tuple(p) for p in some} <= expected
    assert np.array_equal(some, sample_same_class_pairs(labels, 2, seed=1))
    big = np.repeat(np.arange(3), 50)
    pairs = sample_same_class_pairs(big, 500, seed=2)
    assert len({tuple(p) for p in pairs}) == 500
    assert (pairs[:, 0] < pairs[:, 1]).all() and (big[pairs[:, 0]] == big[pairs[:, 1]]).all()


# ----------------------------------------------------------------------------- end to end


def test_evaluate_correspondence_end_to_end():
    torch.manual_seed(0)
    data = SyntheticParts("test", num_classes=4, images_per_class=3, image_size=64)
    model = build_model("resnet18", 16)
    out = evaluate_correspondence(model, data, pairs=5, crop=64, resize=64, seed=0, batch_size=4)
    assert out["grid"] == 4 and out["n_cells"] == 16
    assert out["n_pairs_sampled"] == 5 and 0 < out["n_pairs"] <= 5 and out["n_parts"] > 0
    assert not model.extra_heads  # the model is left unchanged
    assert out["uniform"] == pytest.approx(1 / 16) and out["uniform_top1"] == pytest.approx(1 / 16)
    for key in (
        "learned",
        "uniform_marginals",
        "learned_top1",
        "uniform_marginals_top1",
        "learned_empty",
        "upper_bound",
    ):
        assert 0.0 <= out[key] <= 1.0, key
    assert set(out["per_part"]) == set(data.part_names)
    # keypoint transfer (the synthetic images carry boxes): PCK in [0, 1]; a uniform plan
    # sends every part to the crop centre, the oracle cell is the best cell-level guess
    for key in ("learned", "uniform_marginals", "uniform", "nearest", "oracle_cell"):
        assert 0.0 <= out[f"pck_{key}"] <= 1.0, key
    assert out["pck_alpha"] == 0.1
    assert set(out["per_part_pck_learned"]) == set(data.part_names)
    masses = [v for v in out["part_mass"].values() if v == v]
    assert masses and all(-1.0 <= v <= 1.0 for v in masses)
    # batching does not matter (up to float32 rounding of the network's batched convolutions)
    again = evaluate_correspondence(model, data, pairs=5, crop=64, resize=64, seed=0, batch_size=5, pair_batch=2)
    nested = [k for k, v in out.items() if isinstance(v, dict)]
    for key in nested:
        assert again.pop(key) == pytest.approx(out[key], abs=1e-5, nan_ok=True), key
    assert again == pytest.approx({k: v for k, v in out.items() if k not in nested}, abs=1e-5)
    # a model with its own spatial head: its grid is used, a different one is refused
    model.add_head("spatial", SpatialGridHead.sharing(model.head, 2))
    out2 = evaluate_correspondence(model, data, pairs=3, crop=64, resize=64, seed=1)
    assert out2["grid"] == 2 and out2["uniform"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="grid"):
        evaluate_correspondence(model, data, pairs=3, crop=64, resize=64, grid=4)


def test_box_side_follows_the_resize():
    from glassmetric.explain.correspondence import box_side_in_eval_frame

    # 200 x 400 (W x H) image, shorter side 200 -> 100: every length halves
    assert box_side_in_eval_frame((10, 20, 100, 50), (200, 400), 100) == pytest.approx(50.0)
    assert box_side_in_eval_frame((0, 0, 30, 90), (300, 150), 150) == pytest.approx(90.0)
    assert math.isnan(box_side_in_eval_frame(None, (300, 150), 150))


def test_unreadable_images_are_skipped_or_named(monkeypatch):
    """Under data.on_bad_image: skip the pairs with an unreadable image are left out (and
    counted); under the default the error names the file."""
    from glassmetric.errors import DataError

    torch.manual_seed(0)
    data = SyntheticParts("test", num_classes=4, images_per_class=3, image_size=64)
    model = build_model("resnet18", 16)
    kw = {"pairs": 12, "crop": 64, "resize": 64, "seed": 0, "batch_size": 4}
    full = evaluate_correspondence(model, data, **kw)
    pairs = sample_same_class_pairs(data.labels, 12, 0)
    bad = int(pairs[0, 0])
    load = data.load

    def flaky(i):
        if i == bad:
            raise DataError(f"cannot read image /data/bird_{i}.jpg: truncated")
        return load(i)

    monkeypatch.setattr(data, "load", flaky)
    with pytest.raises(DataError, match=f"bird_{bad}.jpg"):
        evaluate_correspondence(model, data, **kw)
    data.set_bad_image_policy("skip")
    out = evaluate_correspondence(model, data, **kw)
    lost = int((pairs == bad).any(1).sum())
    assert out["n_pairs_unreadable"] == lost and full["n_pairs_unreadable"] == 0
    assert out["n_pairs_sampled"] == len(pairs) and out["n_pairs"] <= len(pairs) - lost and lost > 0
