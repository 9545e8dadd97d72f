from pathlib import Path

import numpy as np
import pytest
from fixtures import CUB_PARTS, write_cub

from glassmetric.data.base import Sample
from glassmetric.data.cub import CUB200
from glassmetric.errors import ConfigError, DataError

SPLIT = {"train_classes": (1, 2), "test_classes": (3, 4)}


@pytest.fixture
def cub(tmp_path):
    return write_cub(tmp_path / "CUB_200_2011")


def test_split_by_class_range(cub):
    train = CUB200(cub.root, "train", **SPLIT)
    test = CUB200(cub.root, "test", **SPLIT)
    every = CUB200(cub.root, "all")
    assert (len(train), len(test), len(every)) == (5, 5, 10)
    assert set(train.labels) == {1, 2} and set(test.labels) == {3, 4}
    assert train.labels.dtype == np.int64
    assert every.image_ids == cub.image_ids
    assert every.labels.tolist() == [cub.labels[i] for i in cub.image_ids]
    assert every.class_names[3] == "003.Bird_3"
    assert every.part_names == CUB_PARTS


def test_samples_carry_ground_truth(cub):
    test = CUB200(cub.root, "test", **SPLIT)
    for index, image_id in enumerate(test.image_ids):
        sample = test.load(index)
        assert isinstance(sample, Sample)
        assert sample.label == cub.labels[image_id]
        assert sample.bbox == pytest.approx(cub.bboxes[image_id])
        assert sample.keypoints.shape == (15, 3) and sample.keypoints.dtype == np.float32
        np.testing.assert_array_equal(sample.keypoints, cub.keypoints[image_id])
    invisible = cub.keypoints[test.image_ids[0]][:, 2] == 0
    assert invisible.any() and (test.load(0).keypoints[invisible, :2] == 0).all()


def test_greyscale_image_loads_as_rgb_and_transform_applies(cub):
    train = CUB200(cub.root, "train", transform=lambda im: im.size, **SPLIT)
    index = train.image_ids.index(cub.grey_id)
    assert train.load(index).image.mode == "RGB"
    assert train[index] == {"image": (20, 14), "label": 1, "index": index}


def test_parts_and_boxes_are_optional(cub):
    (cub.root / "bounding_boxes.txt").unlink()
    for name in ("parts.txt", "part_locs.txt"):
        (cub.root / "parts" / name).unlink()
    ds = CUB200(cub.root, "all")
    sample = ds.load(0)
    assert sample.keypoints is None and sample.bbox is None and ds.part_names == ()


def test_default_ranges_and_bad_arguments(cub):
    assert len(CUB200(cub.root, "train")) == 10  # classes 1-4 all fall in 1-100
    with pytest.raises(DataError, match="test_classes"):
        CUB200(cub.root, "test")
    with pytest.raises(ConfigError, match="'val'"):
        CUB200(cub.root, "val")
    with pytest.raises(ConfigError, match="train_classes"):
        CUB200(cub.root, "train", train_classes=(5, 1))


@pytest.mark.parametrize("name", ["images.txt", "image_class_labels.txt", "classes.txt", "parts/part_locs.txt"])
def test_missing_file_is_named(cub, name):
    (cub.root / name).unlink()
    with pytest.raises(DataError, match=name.split("/")[-1]):
        CUB200(cub.root, "all")


def _replace_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "name, lineno, text",
    [
        ("images.txt", 4, "4"),
        ("image_class_labels.txt", 3, "x 1"),
        ("bounding_boxes.txt", 5, "5 1.0 2.0 3.0"),
        ("parts/part_locs.txt", 7, "1 7 1.0 2.0 yes"),
        ("parts/part_locs.txt", 8, "1 8 1.0 2.0 2"),
        ("parts/parts.txt", 2, "two beak"),
    ],
)
def test_malformed_line_names_file_and_line(cub, name, lineno, text):
    _replace_line(cub.root / name, lineno, text)
    with pytest.raises(DataError, match=rf"{name.split('/')[-1]}:{lineno}:"):
        CUB200(cub.root, "all")


@pytest.mark.parametrize(
    "name, line",
    [("image_class_labels.txt", "99 1"), ("bounding_boxes.txt", "99 1 1 1 1"), ("parts/part_locs.txt", "99 1 1 1 1")],
)
def test_unknown_image_id(cub, name, line):
    with open(cub.root / name, "a") as f:
        f.write(line + "\n")
    with pytest.raises(DataError, match=r"image id 99 is not in images\.txt"):
        CUB200(cub.root, "all")


def test_inconsistent_ids_and_classes(cub):
    labels_file = cub.root / "image_class_labels.txt"
    first_id = labels_file.read_text().split()[0]
    _replace_line(labels_file, 1, f"{first_id} 9")
    with pytest.raises(DataError, match=r"image_class_labels.txt:1: class id 9 is not in classes.txt"):
        CUB200(cub.root, "all")
    write_cub(cub.root)
    with open(cub.root / "images.txt", "a") as f:
        f.write("11 001.Bird_1/extra.jpg\n")
    with pytest.raises(DataError, match=r"images.txt:11: image id 11 has no line"):
        CUB200(cub.root, "all")
    _replace_line(cub.root / "images.txt", 11, "2 001.Bird_1/extra.jpg")
    with pytest.raises(DataError, match=r"images.txt:11: id 2 already given on line 2"):
        CUB200(cub.root, "all")


def test_missing_image_file_is_named(cub):
    missing = cub.root / "images" / "003.Bird_3" / "Bird_3_0001.jpg"
    missing.unlink()
    CUB200(cub.root, "train", **SPLIT)  # only the split's images are checked
    with pytest.raises(DataError, match=r"Bird_3_0001.jpg \(images.txt line 7\)"):
        CUB200(cub.root, "test", **SPLIT)
