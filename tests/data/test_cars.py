import numpy as np
import pytest
import scipy.io
from fixtures import write_cars

from glassmetric.data.cars import Cars196
from glassmetric.errors import ConfigError, DataError

SPLIT = {"train_classes": (1, 2), "test_classes": (3, 4)}


@pytest.mark.parametrize("column", [False, True], ids=["1xN", "Nx1"])
def test_split_labels_and_boxes(tmp_path, column):
    cars = write_cars(tmp_path, column=column)
    train = Cars196(tmp_path, "train", **SPLIT)
    test = Cars196(tmp_path, "test", **SPLIT)
    assert (len(train), len(test), len(Cars196(tmp_path, "all"))) == (5, 4, 9)
    assert train.labels.tolist() == cars.labels[:5] and test.labels.tolist() == cars.labels[5:]
    assert train.labels.dtype == np.int64
    assert train.class_names == dict(enumerate(cars.class_names, start=1))
    for index in range(len(test)):
        sample = test.load(index)
        x1, y1, x2, y2 = cars.boxes[5 + index]
        assert sample.label == cars.labels[5 + index]
        assert sample.bbox == (x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1)
        assert sample.meta["path"].endswith(cars.paths[5 + index])


def test_greyscale_image_loads_as_rgb(tmp_path):
    write_cars(tmp_path)
    assert Cars196(tmp_path, "train", **SPLIT).load(0).image.mode == "RGB"


def test_default_ranges(tmp_path):
    write_cars(tmp_path)
    assert len(Cars196(tmp_path, "train")) == 9
    with pytest.raises(DataError, match="test_classes"):
        Cars196(tmp_path, "test")
    with pytest.raises(ConfigError, match="'val'"):
        Cars196(tmp_path, "val")


def test_missing_or_unreadable_mat(tmp_path):
    with pytest.raises(DataError, match=r"cars_annos\.mat"):
        Cars196(tmp_path, "all")
    (tmp_path / "cars_annos.mat").write_text("not a mat file")
    with pytest.raises(DataError, match=r"cannot read .*cars_annos\.mat"):
        Cars196(tmp_path, "all")


def _rewrite(tmp_path, edit):
    mat = scipy.io.loadmat(tmp_path / "cars_annos.mat")
    edit(mat)
    scipy.io.savemat(tmp_path / "cars_annos.mat", {k: v for k, v in mat.items() if not k.startswith("__")})


def test_missing_field_and_bad_annotation(tmp_path):
    write_cars(tmp_path)
    _rewrite(tmp_path, lambda mat: mat.pop("class_names"))
    with pytest.raises(DataError, match=r"cars_annos\.mat: no 'class_names'"):
        Cars196(tmp_path, "all")

    write_cars(tmp_path)
    ann = scipy.io.loadmat(tmp_path / "cars_annos.mat")["annotations"]
    trimmed = np.zeros(ann.shape, dtype=[(n, "O") for n in ann.dtype.names if n != "bbox_y2"])
    for name in trimmed.dtype.names:
        trimmed[name] = ann[name]
    _rewrite(tmp_path, lambda mat: mat.update(annotations=trimmed))
    with pytest.raises(DataError, match=r"lack the fields \['bbox_y2'\]"):
        Cars196(tmp_path, "all")

    write_cars(tmp_path)
    _rewrite(tmp_path, lambda mat: mat["annotations"][0, 3].__setitem__("class", np.array([[0]])))
    with pytest.raises(DataError, match=r"annotation 4: class 0 is not in 1..4"):
        Cars196(tmp_path, "all")

    write_cars(tmp_path)
    _rewrite(tmp_path, lambda mat: mat["annotations"][0, 2].__setitem__("bbox_x1", np.array([[1, 2]])))
    with pytest.raises(DataError, match=r"annotation 3: expected one value"):
        Cars196(tmp_path, "all")


def test_missing_image_file_is_named(tmp_path):
    write_cars(tmp_path)
    (tmp_path / "car_ims" / "000007.jpg").unlink()
    Cars196(tmp_path, "train", **SPLIT)
    with pytest.raises(DataError, match=r"000007.jpg \(annotation 7"):
        Cars196(tmp_path, "test", **SPLIT)
