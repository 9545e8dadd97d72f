import numpy as np
import pytest
from fixtures import write_image

from glassmetric.data.folder import CSVDataset, ImageFolderDataset, QueryGallery, build_query_gallery
from glassmetric.errors import ConfigError, DataError


def _folder(root, files):
    for rel in files:
        path = root / rel
        if rel.lower().endswith((".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif")):
            write_image(path, grey=rel.endswith("grey.png"))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("not an image")
    return root


def test_image_folder_layout(tmp_path):
    root = _folder(
        tmp_path,
        [
            "dog/b.JPG",
            "dog/a.png",
            "dog/sub/c.jpeg",
            "dog/notes.txt",
            "dog/.hidden.jpg",
            "dog/.cache/d.jpg",
            "cat/grey.png",
            "cat/x.BMP",
            "cat/y.webp",
            "cat/z.tif",
            ".trash/e.jpg",
        ],
    )
    (tmp_path / "empty").mkdir()
    ds = ImageFolderDataset(root, transform=lambda im: im.mode)
    assert ds.class_names == ("cat", "dog", "empty")
    rel = [p.relative_to(root).as_posix() for p in ds.paths]
    assert rel == ["cat/grey.png", "cat/x.BMP", "cat/y.webp", "cat/z.tif", "dog/a.png", "dog/b.JPG", "dog/sub/c.jpeg"]
    assert ds.labels.tolist() == [0, 0, 0, 0, 1, 1, 1] and ds.labels.dtype == np.int64
    assert ds[0] == {"image": "RGB", "label": 0, "index": 0}
    assert ds.load(6).meta["path"].endswith("c.jpeg")


def test_image_folder_explicit_classes_and_errors(tmp_path):
    root = _folder(tmp_path / "imgs", ["a/1.jpg", "b/1.jpg", "c/1.jpg"])
    ds = ImageFolderDataset(root, classes=["c", "a", "zzz"])
    assert ds.labels.tolist() == [0, 1] and ds.class_names == ("c", "a", "zzz")
    with pytest.raises(ConfigError, match="duplicate"):
        ImageFolderDataset(root, classes=["a", "a"])
    with pytest.raises(DataError, match=r"image folder not found: .*nowhere"):
        ImageFolderDataset(tmp_path / "nowhere")
    _folder(tmp_path / "noimg", ["a/readme.txt"])
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataset(tmp_path / "noimg")


def test_query_gallery_matches_classes_by_name(tmp_path):
    photos = _folder(tmp_path / "photos", ["dog/p1.jpg", "cat/p1.jpg", "cat/p2.jpg", "owl/p1.jpg"])
    paintings = _folder(tmp_path / "paintings", ["cat/q1.png", "dog/q1.png", "dog/q2.png", "ant/q1.png"])
    pair = build_query_gallery(photos, paintings)
    assert isinstance(pair, QueryGallery)
    names = ("ant", "cat", "dog", "owl")
    assert pair.query.class_names == pair.gallery.class_names == names
    label = {
        p.parent.name: int(y) for ds in (pair.query, pair.gallery) for p, y in zip(ds.paths, ds.labels, strict=True)
    }
    assert label == {n: i for i, n in enumerate(names)}
    assert len(pair.query) == 4 and len(pair.gallery) == 4  # owl queries kept, ant is a distractor
    assert sorted(pair.query.labels.tolist()) == [1, 1, 2, 3]


def _csv(tmp_path, text, name="list.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_string_labels_and_paths(tmp_path):
    write_image(tmp_path / "imgs" / "a.jpg")
    write_image(tmp_path / "imgs" / "b.png", grey=True)
    write_image(tmp_path / "other" / "c.jpg")
    text = f"id,path,label\n1,imgs/a.jpg,zebra\n\n2,imgs/b.png,ant\n3,{tmp_path / 'other' / 'c.jpg'},zebra\n"
    ds = CSVDataset(_csv(tmp_path, text))
    assert ds.class_names == ("ant", "zebra")
    assert ds.labels.tolist() == [1, 0, 1]
    assert ds.load(1).image.mode == "RGB"
    (tmp_path / "sub").mkdir()
    moved = CSVDataset(_csv(tmp_path / "sub", "path,label\nimgs/a.jpg,x\n"), root=tmp_path)
    assert moved.paths == [tmp_path / "imgs" / "a.jpg"]


def test_csv_integer_labels_sort_numerically(tmp_path):
    for name in "abc":
        write_image(tmp_path / f"{name}.jpg")
    ds = CSVDataset(_csv(tmp_path, "path,label\na.jpg,10\nb.jpg,9\nc.jpg,10\n"))
    assert ds.class_names == ("9", "10") and ds.labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    "text, message",
    [
        ("file,label\na.jpg,1\n", r"list.csv:1: the header"),
        ("path,label\na.jpg,1\na.jpg\n", r"list.csv:3: expected 2 columns"),
        ("path,label\na.jpg,1\n\na.jpg, \n", r"list.csv:4: empty path or label"),
        ("path,label\na.jpg,1\nmissing.jpg,2\n", r"missing.jpg \(.*list.csv:3\)"),
        ("path,label\n", r"list.csv lists no images"),
    ],
)
def test_csv_errors(tmp_path, text, message):
    write_image(tmp_path / "a.jpg")
    with pytest.raises(DataError, match=message):
        CSVDataset(_csv(tmp_path, text))


def test_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"file not found: .*absent\.csv"):
        CSVDataset(tmp_path / "absent.csv")
