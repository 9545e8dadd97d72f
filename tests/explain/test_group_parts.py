"""Group distinctness: top-region IoU and peak-to-part assignment against brute force."""

import itertools
import math
from typing import ClassVar

import numpy as np
import pytest
import torch

from glassmetric.data.synthetic import SyntheticParts
from glassmetric.errors import ConfigError
from glassmetric.explain.group_parts import (
    attention_peaks,
    attention_spread,
    chance_iou,
    evaluate_group_parts,
    group_part_mutual_information,
    nearest_parts,
    pairwise_iou,
    part_assignment,
    top_region_masks,
)
from glassmetric.models import build_model
from glassmetric.models.grouping_head import GroupingHead


def test_top_regions_and_iou_match_sets():
    torch.manual_seed(0)
    att = torch.rand(4, 3, 5, 4).softmax(-1)
    masks = top_region_masks(att, fraction=0.1)  # ceil(0.1 * 20) = 2 positions
    iou = pairwise_iou(masks)
    for n in range(4):
        regions = [set(np.argsort(-att[n, i].flatten().numpy(), kind="stable")[:2].tolist()) for i in range(3)]
        for i, j in itertools.product(range(3), repeat=2):
            a, b = regions[i], regions[j]
            assert iou[n, i, j].item() == pytest.approx(len(a & b) / len(a | b))
        assert [set(torch.nonzero(masks[n, i]).flatten().tolist()) for i in range(3)] == regions


def test_ties_in_the_top_region_take_the_lower_positions():
    att = torch.full((1, 1, 2, 5), 0.1)
    assert torch.nonzero(top_region_masks(att, 0.2)[0, 0]).flatten().tolist() == [0, 1]


def test_chance_iou_matches_a_simulation_and_limits():
    assert chance_iou(4, 1) == pytest.approx(0.25)
    assert chance_iou(10, 10) == 1.0
    rng = np.random.default_rng(0)
    sims = []
    for _ in range(20000):
        a, b = set(rng.choice(20, 3, replace=False)), set(rng.choice(20, 3, replace=False))
        sims.append(len(a & b) / len(a | b))
    assert chance_iou(20, 3) == pytest.approx(np.mean(sims), abs=0.005)


def test_peaks_nearest_parts_and_assignment_match_loops():
    torch.manual_seed(1)
    att = torch.rand(6, 2, 3, 4)
    kps = torch.rand(6, 5, 3) * 60
    kps[..., 2] = (torch.rand(6, 5) > 0.3).float()
    kps[0, :, 2] = 0  # no visible part
    peaks = attention_peaks(att, crop=60)
    nearest = nearest_parts(peaks, kps)
    expected_counts = np.zeros((2, 5), dtype=int)
    for n in range(6):
        for g in range(2):
            flat = att[n, g].flatten()
            p = int(flat.argmax())
            r, c = divmod(p, 4)
            x, y = (c + 0.5) * 60 / 4, (r + 0.5) * 60 / 3
            assert peaks[n, g].tolist() == pytest.approx([x, y])
            vis = [q for q in range(5) if kps[n, q, 2] > 0]
            if not vis:
                assert nearest[n, g] == -1
                continue
            best = min(vis, key=lambda q: (math.hypot(kps[n, q, 0] - x, kps[n, q, 1] - y), q))
            assert nearest[n, g] == best
            expected_counts[g, best] += 1
    assert part_assignment(nearest, 5).numpy().tolist() == expected_counts.tolist()


def test_a_group_that_always_peaks_at_one_position_is_flagged_as_fixed():
    class Fixed(torch.nn.Module):
        """Attention fixed on position 3 (group 1) or moving with the image (group 2)."""

        extra_heads: ClassVar[dict[str, None]] = {"grouping": None}

        def forward(self, images):
            n = len(images)
            att = torch.zeros(n, 2, 2, 2)
            att[:, 0, 1, 1] = 1.0
            moving = torch.arange(n) % 4
            att[torch.arange(n), 1, moving // 2, moving % 2] = 1.0
            return type("Out", (), {"attention": att})()

    data = SyntheticParts("test", num_classes=4, images_per_class=2, image_size=64)
    out = evaluate_group_parts(Fixed(), data, images=8, crop=64, resize=64, batch_size=8)
    assert out["groups"]["1"]["fixed_position"] == 1.0
    assert out["groups"]["2"]["fixed_position"] == pytest.approx(0.25)
    assert out["iou_pairs"]["1-2"] == pytest.approx(0.25)  # the moving group meets position 3 in 2 of 8 images


def test_mutual_information_matches_the_definition():
    counts = torch.tensor([[6, 1, 0], [2, 2, 5]])
    joint = counts.double().numpy() / counts.sum().item()
    pg, pp = joint.sum(1), joint.sum(0)
    expect = sum(
        joint[g, p] * math.log(joint[g, p] / (pg[g] * pp[p])) for g in range(2) for p in range(3) if joint[g, p] > 0
    )
    assert group_part_mutual_information(counts) == pytest.approx(expect)
    # independent groups and parts: 0; each group its own part: log k
    assert group_part_mutual_information(torch.tensor([[2, 4], [1, 2]])) == pytest.approx(0.0, abs=1e-12)
    assert group_part_mutual_information(torch.tensor([[5, 0, 0], [0, 5, 0], [0, 0, 5]])) == pytest.approx(math.log(3))
    assert math.isnan(group_part_mutual_information(torch.zeros(2, 3, dtype=torch.long)))


def test_attention_spread_is_the_perplexity_of_each_map():
    """exp(entropy) per map, brute force; one position -> 1, uniform -> h * w, zeros allowed."""
    torch.manual_seed(3)
    att = torch.rand(5, 2, 3, 4)
    att[0, 0] = 0
    att[0, 0, 1, 2] = 1.0  # all mass on one position
    att[1, 1] = 1.0  # uniform
    att[2, 0, 0] = 0  # a row of zeros
    att = att / att.flatten(2).sum(-1)[..., None, None]
    spread = attention_spread(att)
    for n in range(5):
        for g in range(2):
            p = [float(v) for v in att[n, g].flatten() if v > 0]
            assert spread[n, g].item() == pytest.approx(math.exp(-sum(v * math.log(v) for v in p)))
    assert spread[0, 0].item() == pytest.approx(1.0) and spread[1, 1].item() == pytest.approx(12.0)


def test_evaluate_group_parts_end_to_end():
    torch.manual_seed(0)
    model = build_model("resnet18", 12)
    model.add_head("grouping", GroupingHead(512, 12, 3))
    data = SyntheticParts("test", num_classes=8, images_per_class=3, image_size=64)
    out = evaluate_group_parts(model, data, images=10, crop=64, resize=64, batch_size=5)
    assert out["n_images"] == 10 and out["positions"] == 4 and out["n_top"] == 1
    assert set(out["iou_pairs"]) == {"1-2", "1-3", "2-3"} and 0 <= out["iou"] <= 1
    assert out["iou_chance"] == pytest.approx(0.25)
    assert set(out["groups"]) == {"1", "2", "3"}
    for g in out["groups"].values():
        assert g["part"] in data.part_names and sum(g["counts"].values()) <= 10
        assert g["share"] == pytest.approx(g["counts"][g["part"]] / sum(g["counts"].values()))
        assert 0.25 <= g["fixed_position"] <= 1.0  # 4 positions: the most frequent holds >= 1/4
        assert 1.0 - 1e-9 <= g["spread"] <= 4.0 + 1e-9
    assert 0.0 <= out["mi"] <= math.log(3) + 1e-12 and 0.0 <= out["mi_random"] <= math.log(3) + 1e-12
    with pytest.raises(ConfigError, match=r"model\.groups"):
        evaluate_group_parts(build_model("resnet18", 8), data, images=2, crop=64, resize=64)


def test_unreadable_images_are_left_out_under_skip(monkeypatch):
    from glassmetric.errors import DataError

    torch.manual_seed(0)
    model = build_model("resnet18", 12)
    model.add_head("grouping", GroupingHead(512, 12, 3))
    data = SyntheticParts("test", num_classes=4, images_per_class=3, image_size=64)
    load = data.load

    def flaky(i):
        if i in (0, 5):
            raise DataError(f"cannot read image /data/bird_{i}.jpg: truncated")
        return load(i)

    monkeypatch.setattr(data, "load", flaky)
    with pytest.raises(DataError, match=r"bird_0\.jpg"):
        evaluate_group_parts(model, data, images=len(data), crop=64, resize=64, batch_size=4)
    data.set_bad_image_policy("skip")
    out = evaluate_group_parts(model, data, images=len(data), crop=64, resize=64, batch_size=4)
    assert out["n_images"] == len(data) - 2
    assert all(sum(g["counts"].values()) <= len(data) - 2 for g in out["groups"].values())
