"""The CUB loader on the real CUB-50 subset (../shared/data/cub50), read in full."""

import numpy as np
import pytest

from glassmetric.data.cub import CUB200

pytestmark = pytest.mark.realdata
SPLIT = {"train_classes": (1, 25), "test_classes": (26, 50)}


def test_split_sizes_and_parts(cub50_root):
    train = CUB200(cub50_root, "train", **SPLIT)
    test = CUB200(cub50_root, "test", **SPLIT)
    assert (len(train), len(test)) == (1402, 1487)
    assert set(train.labels) == set(range(1, 26)) and set(test.labels) == set(range(26, 51))
    assert len(train.part_names) == 15 and "beak" in train.part_names


def test_every_image_loads_with_box_and_keypoints_inside(cub50_root):
    every = CUB200(cub50_root, "all")
    assert len(every) == 2889
    for i in range(len(every)):
        sample = every.load(i)
        w, h = sample.image.size
        assert sample.image.mode == "RGB" and min(w, h) <= 256  # shorter side 256, never upscaled
        kp = sample.keypoints
        assert kp.shape == (15, 3)
        visible = kp[kp[:, 2] == 1]
        assert ((visible[:, 0] >= 0) & (visible[:, 0] <= w) & (visible[:, 1] >= 0) & (visible[:, 1] <= h)).all(), i
        assert (kp[kp[:, 2] == 0][:, :2] == 0).all()
        x, y, bw, bh = sample.bbox
        # some original CUB boxes reach a few percent past the image border (up to 6.4% here)
        assert 0 <= x < w and 0 <= y < h and bw > 0 and bh > 0
        assert x + bw <= 1.07 * w and y + bh <= 1.07 * h
    counts = np.bincount(every.labels)[1:]
    assert len(counts) == 50 and counts.min() >= 41 and counts.max() <= 60


def test_greyscale_images_load_as_rgb(cub50_root):
    every = CUB200(cub50_root, "all")
    grey = [
        i
        for i, p in enumerate(every.paths)
        if "Brewer_Blackbird_0028_2682" in str(p) or "Pelagic_Cormorant_0022_23802" in str(p)
    ]
    assert len(grey) == 2
    for i in grey:
        assert every.load(i).image.mode == "RGB"
