import numpy as np
import pytest
from fixtures import write_sop

from glassmetric.data.sop import StanfordOnlineProducts
from glassmetric.errors import ConfigError, DataError


@pytest.fixture
def sop(tmp_path):
    return write_sop(tmp_path)


def test_split_by_file(sop):
    for split in ("train", "test"):
        ds = StanfordOnlineProducts(sop.root, split)
        rows = sop.rows[split]
        assert len(ds) == len(rows)
        assert ds.labels.dtype == np.int64
        assert ds.labels.tolist() == [r[1] for r in rows]
        assert ds.super_labels.tolist() == [r[2] for r in rows]
        sample = ds.load(len(ds) - 1)
        assert sample.label == rows[-1][1] and sample.meta["path"].endswith(rows[-1][3])
    assert set(StanfordOnlineProducts(sop.root, "train").labels) == {1, 2, 3}
    assert set(StanfordOnlineProducts(sop.root, "test").labels) == {4, 5}


def test_greyscale_image_loads_as_rgb(sop):
    ds = StanfordOnlineProducts(sop.root, "train", transform=lambda im: im.mode)
    assert ds[2] == {"image": "RGB", "label": 2, "index": 2}


def test_errors(sop):
    with pytest.raises(ConfigError, match="'all'"):
        StanfordOnlineProducts(sop.root, "all")
    (sop.root / sop.rows["test"][1][3]).unlink()
    with pytest.raises(DataError, match=r"_1.JPG \(Ebay_test.txt line 3\)"):
        StanfordOnlineProducts(sop.root, "test")
    (sop.root / "Ebay_test.txt").unlink()
    with pytest.raises(DataError, match=r"file not found: .*Ebay_test\.txt"):
        StanfordOnlineProducts(sop.root, "test")


@pytest.mark.parametrize(
    "lineno, text, message",
    [
        (1, "image_id class_id path", "Ebay_train.txt:1: expected the header"),
        (3, "2 1 1", "Ebay_train.txt:3: expected '<image_id>"),
        (4, "3 one 1 bicycle_final/x.JPG", "Ebay_train.txt:4: expected"),
    ],
)
def test_malformed_line_names_file_and_line(sop, lineno, text, message):
    path = sop.root / "Ebay_train.txt"
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        StanfordOnlineProducts(sop.root, "train")
