"""Group sharpness on hand-made attention maps, and the mass count against every subset of positions."""

import itertools
import math

import pytest
import torch

from glassmetric.explain.group_sharpness import group_sharpness, mass_positions


def maps(*rows):
    """``(1, k, 1, P)`` attention from k rows of P masses."""
    return torch.tensor(rows, dtype=torch.float64)[None, :, None, :]


def test_mass_positions_of_hand_made_maps():
    one_hot = [0.0] * 48 + [1.0]
    uniform = [1 / 49] * 49
    steps = [0.5, 0.3, 0.15, 0.05] + [0.0] * 45
    exact = [0.6, 0.3, 0.1] + [0.0] * 46  # 0.6 + 0.3 is 0.8999999999999999 in floating point
    counts = mass_positions(maps(one_hot, uniform, steps, exact), mass=0.9)
    assert counts.tolist() == [[1, math.ceil(0.9 * 49), 3, 2]]
    assert mass_positions(maps(steps), mass=0.5).tolist() == [[1]]
    assert mass_positions(maps(steps), mass=1.0).tolist() == [[4]]


def test_mass_positions_is_the_smallest_subset_reaching_the_mass():
    gen = torch.Generator().manual_seed(0)
    att = torch.rand(20, 3, 2, 3, generator=gen) ** 3
    att = att / att.flatten(2).sum(-1)[..., None, None]
    counts = mass_positions(att, mass=0.8)
    for n, g in itertools.product(range(20), range(3)):
        values = att[n, g].flatten().tolist()
        smallest = min(
            size
            for size in range(1, 7)
            for subset in itertools.combinations(values, size)
            if sum(subset) >= 0.8 - 1e-12
        )
        assert counts[n, g].item() == smallest


def test_group_sharpness_summary():
    sharp = [0.0] * 46 + [0.4, 0.3, 0.3]  # 3 positions, perplexity exp(H(0.4, 0.3, 0.3))
    wide = [1 / 49] * 49
    att = torch.cat([maps(sharp, wide), maps(sharp, sharp)])  # 2 images, 2 groups
    out = group_sharpness(att, mass=0.9, sharp=10)
    entropy = -(0.4 * math.log(0.4) + 2 * 0.3 * math.log(0.3))
    assert out["positions"] == 49
    assert out["groups"]["1"] == pytest.approx(
        {"mass_positions": 3.0, "effective_positions": math.exp(entropy), "sharp_share": 1.0}
    )
    assert out["groups"]["2"]["mass_positions"] == pytest.approx((45 + 3) / 2)
    assert out["groups"]["2"]["effective_positions"] == pytest.approx((49 + math.exp(entropy)) / 2)
    assert out["groups"]["2"]["sharp_share"] == 0.5
    assert out["widest"] == pytest.approx(24.0) and out["all_sharp"] is False
    assert group_sharpness(maps(sharp, sharp))["all_sharp"] is True


def test_unnormalised_maps_are_normalised_and_bad_input_refused():
    assert mass_positions(maps([5.0, 3.0, 2.0]), mass=0.75).tolist() == [[2]]
    with pytest.raises(ValueError, match="mass"):
        mass_positions(maps([1.0]), mass=0.0)
    with pytest.raises(ValueError, match=r"\(N, k, h, w\)"):
        mass_positions(torch.ones(3, 4))
