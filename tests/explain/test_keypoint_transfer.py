"""Keypoint transfer through plans and PCK, against per-part Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from glassmetric.explain.keypoint_transfer import (
    cell_centre_grid,
    nearest_cell_transfer,
    oracle_cell_transfer,
    pck_hits,
    plan_transfer,
)


def test_cell_centres_are_row_major_pixel_centres():
    c = cell_centre_grid(2, 100)
    assert c.tolist() == [[25.0, 25.0], [75.0, 25.0], [25.0, 75.0], [75.0, 75.0]]
    with pytest.raises(ValueError):
        cell_centre_grid(0, 100)


def test_plan_transfer_matches_a_loop():
    g, crop = 3, 90
    centres = cell_centre_grid(g, crop)
    gen = torch.Generator().manual_seed(0)
    plans = torch.rand(4, 9, 9, generator=gen, dtype=torch.float64)
    plans[1, 4] = 0.0  # a massless row: no prediction
    cells = torch.tensor([[0, 4, -1], [4, 8, 2], [1, 1, 1], [-1, -1, 3]])
    pred, ok = plan_transfer(plans, cells, centres)
    for b in range(4):
        for p in range(3):
            c = int(cells[b, p])
            if c < 0 or plans[b, c].sum() == 0:
                assert not ok[b, p]
                continue
            assert ok[b, p]
            expect = sum(plans[b, c, j] * centres[j] for j in range(9)) / plans[b, c].sum()
            assert torch.allclose(pred[b, p], expect)


def test_uniform_plan_sends_every_part_to_the_crop_centre():
    centres = cell_centre_grid(4, 224)
    plans = torch.full((1, 16, 16), 1 / 256, dtype=torch.float64)
    pred, ok = plan_transfer(plans, torch.tensor([[0, 5, 15]]), centres)
    assert ok.all() and torch.allclose(pred, torch.full_like(pred, 112.0))


def test_nearest_and_oracle_cells():
    centres = cell_centre_grid(2, 10)
    S = torch.tensor([[[0.1, 0.9, 0.0, 0.0], [0.5, 0.5, 0.2, 0.1], [0, 0, 0, 1.0], [0, 1.0, 0, 0]]])
    pred, ok = nearest_cell_transfer(S, torch.tensor([[0, 1, 2, -1]]), centres)
    assert pred[0, :3].tolist() == [centres[1].tolist(), centres[0].tolist(), centres[3].tolist()]
    assert ok.tolist() == [[True, True, True, False]]
    pred, ok = oracle_cell_transfer(torch.tensor([[3, -1]]), centres)
    assert pred[0, 0].tolist() == centres[3].tolist() and ok.tolist() == [[True, False]]


def test_pck_counts_hits_within_alpha_of_the_box_side():
    pred = torch.tensor([[[10.0, 10.0], [10.0, 10.0], [0.0, 0.0], [50.0, 50.0]]])
    true = torch.tensor([[[13.0, 14.0, 1.0], [16.0, 10.0, 1.0], [0.0, 0.0, 0.0], [50.0, 50.0, 1.0]]])
    valid = torch.tensor([[True, True, True, False]])
    common = torch.tensor([[True, True, False, True]])
    hits = pck_hits(pred, valid, true, torch.tensor([50.0]), common, alpha=0.1)  # threshold 5 px
    assert hits[0, 0] == 1.0 and hits[0, 1] == 0.0 and math.isnan(hits[0, 2]) and hits[0, 3] == 0.0
    with pytest.raises(ValueError):
        pck_hits(pred, valid, true, torch.tensor([50.0]), common, alpha=0.0)
