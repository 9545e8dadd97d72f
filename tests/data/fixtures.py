"""Writers of tiny data sets in the official layouts, for the loader tests.

Each writer fills a (tmp) folder and returns what it wrote, so tests can compare the loaders'
output with it. Images are small solid-colour JPEGs; one per data set is greyscale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

CUB_PARTS = (
    "back",
    "beak",
    "belly",
    "breast",
    "crown",
    "forehead",
    "left eye",
    "left leg",
    "left wing",
    "nape",
    "right eye",
    "right leg",
    "right wing",
    "tail",
    "throat",
)


def write_image(path: Path, size: tuple[int, int] = (20, 14), grey: bool = False, seed: int = 0) -> Path:
    """A small solid-colour image (greyscale when ``grey``), format from the file extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if grey:
        Image.new("L", size, int(rng.integers(256))).save(path)
    else:
        Image.new("RGB", size, tuple(int(v) for v in rng.integers(256, size=3))).save(path)
    return path


@dataclass
class CubFixture:
    root: Path
    labels: dict[int, int]  # image id -> class id
    bboxes: dict[int, tuple[float, float, float, float]]
    keypoints: dict[int, np.ndarray]  # image id -> (15, 3)
    grey_id: int
    image_ids: list[int] = field(default_factory=list)  # in images.txt order


def write_cub(root: Path, images_per_class: tuple[int, ...] = (3, 2, 3, 2)) -> CubFixture:
    """CUB-200-2011 layout with classes 1..len(images_per_class); image 2 is greyscale."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "parts").mkdir(exist_ok=True)
    classes = {c: f"{c:03d}.Bird_{c}" for c in range(1, len(images_per_class) + 1)}
    fx = CubFixture(root, {}, {}, {}, grey_id=2)
    image_lines, bbox_lines, loc_lines = [], [], []
    image_id = 0
    for c, count in zip(classes, images_per_class, strict=True):
        for k in range(count):
            image_id += 1
            rel = f"{classes[c]}/Bird_{c}_{k:04d}.jpg"
            write_image(root / "images" / rel, grey=image_id == fx.grey_id, seed=image_id)
            image_lines.append(f"{image_id} {rel}")
            fx.image_ids.append(image_id)
            fx.labels[image_id] = c
            box = (float(image_id), 2.5, 10.0 + image_id, 8.25)
            fx.bboxes[image_id] = box
            bbox_lines.append(f"{image_id} " + " ".join(f"{v:.2f}" for v in box))
            kp = np.zeros((len(CUB_PARTS), 3), dtype=np.float32)
            for p in range(len(CUB_PARTS)):
                if rng.random() < 0.6:
                    kp[p] = (round(float(rng.uniform(0, 19)), 1), round(float(rng.uniform(0, 13)), 1), 1.0)
                loc_lines.append(f"{image_id} {p + 1} {kp[p, 0]:.1f} {kp[p, 1]:.1f} {int(kp[p, 2])}")
            fx.keypoints[image_id] = kp
    label_lines = [f"{i} {c}" for i, c in fx.labels.items()]
    rng.shuffle(label_lines)  # the loader must join by id, not by line
    _write_lines(root / "images.txt", image_lines)
    _write_lines(root / "image_class_labels.txt", label_lines)
    _write_lines(root / "classes.txt", [f"{c} {n}" for c, n in classes.items()])
    _write_lines(root / "bounding_boxes.txt", bbox_lines)
    _write_lines(root / "train_test_split.txt", [f"{i} {i % 2}" for i in fx.labels])
    _write_lines(root / "parts" / "parts.txt", [f"{p + 1} {n}" for p, n in enumerate(CUB_PARTS)])
    _write_lines(root / "parts" / "part_locs.txt", loc_lines)
    return fx


@dataclass
class CarsFixture:
    root: Path
    paths: list[str]
    labels: list[int]
    boxes: list[tuple[int, int, int, int]]  # x1, y1, x2, y2 as written (1-based inclusive)
    class_names: list[str]


def write_cars(root: Path, images_per_class: tuple[int, ...] = (2, 3, 2, 2), column: bool = False) -> CarsFixture:
    """``cars_annos.mat`` layout with classes 1..len(images_per_class); image 1 is greyscale.

    The struct array is (1, N) like the official file, or (N, 1) with ``column``.
    """
    names = [f"Make Model {c} 20{c:02d}" for c in range(1, len(images_per_class) + 1)]
    fx = CarsFixture(root, [], [], [], names)
    for c, count in enumerate(images_per_class, start=1):
        for _ in range(count):
            k = len(fx.paths) + 1
            rel = f"car_ims/{k:06d}.jpg"
            write_image(root / rel, size=(30, 20), grey=k == 1, seed=k)
            fx.paths.append(rel)
            fx.labels.append(c)
            fx.boxes.append((k, 2, 20 + k % 5, 15))
    dtype = [(f, "O") for f in ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")]
    annotations = np.zeros((1, len(fx.paths)), dtype=dtype)
    for k, (rel, label, box) in enumerate(zip(fx.paths, fx.labels, fx.boxes, strict=True)):
        values = [np.array([[v]], dtype=np.uint16) for v in (*box, label, k % 2)]
        annotations[0, k] = (np.array([rel]), *values)
    class_names = np.empty((1, len(names)), dtype=object)
    class_names[0, :] = names
    if column:
        annotations, class_names = annotations.T, class_names.T
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})
    return fx


@dataclass
class SopFixture:
    root: Path
    rows: dict[str, list[tuple[int, int, int, str]]]  # split -> (image_id, class_id, super_class_id, path)


def write_sop(root: Path) -> SopFixture:
    """SOP layout: train classes 1-3, test classes 4-5, two super classes; one greyscale image."""
    supers = {1: "bicycle", 2: "chair"}
    classes = {"train": [(1, 1, 2), (2, 1, 3), (3, 2, 2)], "test": [(4, 1, 2), (5, 2, 3)]}
    fx = SopFixture(root, {})
    image_id = 0
    for split, spec in classes.items():
        rows = []
        for class_id, super_id, count in spec:
            for k in range(count):
                image_id += 1
                rel = f"{supers[super_id]}_final/{class_id}000{k}_{k}.JPG"
                write_image(root / rel, grey=image_id == 3, seed=image_id)
                rows.append((image_id, class_id, super_id, rel))
        fx.rows[split] = rows
        lines = ["image_id class_id super_class_id path", *(" ".join(map(str, r)) for r in rows)]
        _write_lines(root / f"Ebay_{split}.txt", lines)
    return fx


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
