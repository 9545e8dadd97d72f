"""Tests of the embedded procedural data set."""

import itertools

import numpy as np
import pytest
import torch
from torchvision.transforms import ToTensor

from glassmetric.data.synthetic import _HEAD_RGB, ATTRIBUTES, OCCLUDER, SyntheticParts, _paint_rgb


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


def attribute_distance(a: dict, b: dict) -> int:
    return sum(a[k] != b[k] for k in ATTRIBUTES)


@pytest.fixture(scope="module")
def all_classes():
    return SyntheticParts("all", images_per_class=2)


def test_default_splits_have_over_100_disjoint_classes():
    train, test = SyntheticParts("train"), SyntheticParts("test")
    assert set(train.classes) == set(range(60)) and set(test.classes) == set(range(60, 120))
    everything = SyntheticParts("all")
    assert len(everything.classes) == 120 and len(everything) == 120 * 40
    for ds in (train, test, everything):
        assert ds.labels.dtype == np.int64
        assert np.all(np.diff(ds.labels) >= 0)  # grouped by class
        assert np.all(np.bincount(ds.labels)[ds.classes] == 40)


def test_classes_are_distinct_combinations_many_differing_in_one_attribute(all_classes):
    attrs = [all_classes.class_attributes(c) for c in all_classes.classes]
    assert all(set(a) == set(ATTRIBUTES) for a in attrs)
    assert len({tuple(a.values()) for a in attrs}) == len(attrs)
    for half in (attrs[:60], attrs[60:]):  # fine-grained within each split
        distances = [attribute_distance(a, b) for a, b in itertools.combinations(half, 2)]
        assert distances.count(1) >= 15 and distances.count(2) >= 100
    sole_differences = {
        next(k for k in ATTRIBUTES if a[k] != b[k])
        for a, b in itertools.combinations(attrs, 2)
        if attribute_distance(a, b) == 1
    }
    assert sole_differences == set(ATTRIBUTES)  # every attribute alone separates some classes


def test_train_and_test_classes_cover_the_attribute_space(all_classes):
    attrs = [all_classes.class_attributes(c) for c in all_classes.classes]
    for half in (attrs[:60], attrs[60:]):
        for name, values in ATTRIBUTES.items():
            assert {a[name] for a in half} == set(values)


def test_images_are_deterministic_per_seed_split_and_order():
    ds = SyntheticParts("test", num_classes=10, images_per_class=3, seed=7)
    first = [ds.load(i) for i in (4, 2)]
    assert np.array_equal(pixels(ds.load(2).image), pixels(first[1].image))
    fresh = SyntheticParts("test", num_classes=10, images_per_class=3, seed=7)
    for i, sample in zip((4, 2), first, strict=True):
        again = fresh.load(i)
        assert np.array_equal(pixels(again.image), pixels(sample.image))
        assert np.array_equal(again.keypoints, sample.keypoints) and again.bbox == sample.bbox
    same_image_in_all = SyntheticParts("all", num_classes=10, images_per_class=3, seed=7).load(15 + 4)
    assert np.array_equal(pixels(same_image_in_all.image), pixels(first[0].image))
    other_seed = SyntheticParts("test", num_classes=10, images_per_class=3, seed=8).load(4)
    assert not np.array_equal(pixels(other_seed.image), pixels(first[0].image))
    assert not np.array_equal(pixels(ds.load(5).image), pixels(first[0].image))


@pytest.mark.parametrize("size", [64, 96, 224])
def test_sample_fields(size):
    ds = SyntheticParts("all", num_classes=6, images_per_class=5, image_size=size)
    for i in range(len(ds)):
        s = ds.load(i)
        assert s.image.mode == "RGB" and s.image.size == (size, size)
        assert s.label == ds.labels[i] and s.meta["attributes"] == ds.class_attributes(s.label)
        assert s.keypoints.shape == (len(ds.part_names), 3) and s.keypoints.dtype == np.float32
        visible = s.keypoints[:, 2] == 1
        assert np.all(visible | (s.keypoints[:, 2] == 0))
        assert np.all(s.keypoints[~visible, :2] == 0)
        assert np.all((s.keypoints[visible, :2] >= 0) & (s.keypoints[visible, :2] < size))
        x, y, w, h = s.bbox
        assert x >= 0 and y >= 0 and x + w <= size and y + h <= size and w > size / 4 and h > size / 8
        kx, ky = s.keypoints[visible, 0], s.keypoints[visible, 1]
        assert np.all((kx >= x) & (kx <= x + w) & (ky >= y) & (ky <= y + h))


def test_keypoints_sit_on_their_part_or_the_occluder():
    ds = SyntheticParts("all", num_classes=20, images_per_class=4)
    size = ds.image_size
    visible, exact, occluded = 0, 0, 0
    for i in range(len(ds)):
        keypoints, mask, anchors = ds.load(i).keypoints, ds.part_mask(i), ds._scene(i).anchors
        for part, ((x, y, v), anchor) in enumerate(zip(keypoints, anchors, strict=True)):
            row, col = int(anchor[1]), int(anchor[0])
            if v:
                assert np.allclose((x, y), anchor, atol=1e-3)
                expected = part + 1
                visible += 1
                exact += mask[row, col] == expected
            elif 0 <= anchor[0] < size and 0 <= anchor[1] < size:
                expected = OCCLUDER  # inside the frame but invisible: under the occluder
                occluded += 1
            else:
                continue
            # rasterisation may put a pixel centre just across an edge, never further
            assert (mask[max(row - 1, 0) : row + 2, max(col - 1, 0) : col + 2] == expected).any()
    assert occluded > 5 and exact >= 0.97 * visible


def test_visible_head_pixel_has_the_class_head_colour():
    names = list(_HEAD_RGB)
    for style, palette in (("photo", lambda c: c), ("painting", _paint_rgb)):
        ds = SyntheticParts("all", num_classes=24, images_per_class=3, style=style)
        colours = np.array([palette(_HEAD_RGB[n]) for n in names], dtype=float)
        hits = total = 0
        for i in range(len(ds)):
            s = ds.load(i)
            x, y, v = s.keypoints[ds.part_names.index("head")]
            if v:
                pixel = pixels(s.image)[int(y), int(x)].astype(float)
                hits += names[np.argmin(((colours - pixel) ** 2).sum(axis=1))] == s.meta["attributes"]["head_colour"]
                total += 1
        assert total > 50 and hits >= 0.95 * total


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"split": "val"}, "split"),
        ({"image_size": 63}, "image_size"),
        ({"image_size": 225}, "image_size"),
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 10_000}, "num_classes"),
        ({"images_per_class": 0}, "images_per_class"),
        ({"style": "sketch"}, "style"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SyntheticParts(**kwargs)


def test_index_out_of_range():
    ds = SyntheticParts("train", num_classes=4, images_per_class=2)
    with pytest.raises(IndexError):
        ds.load(len(ds))


def test_painting_keeps_classes_but_changes_pixels():
    photo = SyntheticParts("test", num_classes=8, images_per_class=3)
    painting = SyntheticParts("test", num_classes=8, images_per_class=3, style="painting")
    assert np.array_equal(photo.labels, painting.labels)
    for i in range(len(photo)):
        p, q = photo.load(i), painting.load(i)
        assert p.label == q.label and p.meta == q.meta
        assert np.abs(pixels(p.image).astype(int) - pixels(q.image).astype(int)).mean() > 20


def test_dataloader_workers_give_the_same_tensors():
    ds = SyntheticParts("train", num_classes=4, images_per_class=6, transform=ToTensor())

    def batches(workers):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers)
        return list(loader)

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 3
    for a, b in zip(serial, parallel, strict=True):
        assert a["image"].shape == (4, 3, 96, 96) and a["image"].dtype == torch.float32
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
