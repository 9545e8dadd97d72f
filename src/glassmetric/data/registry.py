"""The data sets by name (:data:`DATASETS`), and the zero-shot splits of the configured one:
train, validation, test.

Train and test classes are disjoint (the benchmarks' protocol). The training split is the
training classes of ``data.root`` joined by those of every ``data.extra_train`` set
(:mod:`glassmetric.data.union`). Validation classes, when asked for, are carved out of all the
training classes, so model selection never sees a test class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from glassmetric.config import DataConfig
from glassmetric.data.base import RetrievalDataset, Subset, split_by_classes
from glassmetric.data.paths import resolve_data_path
from glassmetric.data.union import TrainingSource, TrainingUnion, load_extra
from glassmetric.errors import ConfigError


@dataclass
class Splits:
    train: RetrievalDataset
    val: RetrievalDataset | None
    test: RetrievalDataset
    #: cross-domain protocol: ``test`` holds the queries, ``gallery`` the images they are
    #: searched in (same classes, another domain); None: every test image queries the others
    gallery: RetrievalDataset | None = None


def _class_range_kwargs(cfg: DataConfig) -> dict:
    kwargs = {}
    if cfg.train_classes is not None:
        kwargs["train_classes"] = tuple(cfg.train_classes)
    if cfg.test_classes is not None:
        kwargs["test_classes"] = tuple(cfg.test_classes)
    return kwargs


#: a factory: (data config, training transform, evaluation transform) -> (train, test) data sets
DatasetFactory = Callable[[DataConfig, Callable | None, Callable | None], tuple[RetrievalDataset, RetrievalDataset]]


def _root(cfg: DataConfig) -> Path:
    """``data.root`` (environment variables replaced), which every data set but the synthetic
    one reads its images from."""
    if cfg.root is None:
        raise ConfigError(f"data.root: data set {cfg.name!r} needs a root folder")
    return resolve_data_path(cfg.root, "data.root")


def _synthetic(cfg: DataConfig, train_transform: Callable | None, eval_transform: Callable | None):
    from glassmetric.data.synthetic import SyntheticParts

    s = cfg.synthetic
    common: dict[str, Any] = {
        "num_classes": s.num_classes,
        "images_per_class": s.images_per_class,
        "image_size": cfg.image_size,
        "seed": s.seed,
        "style": s.style,
    }
    return SyntheticParts("train", transform=train_transform, **common), SyntheticParts(
        "test", transform=eval_transform, **common
    )


def _class_range_benchmark(load_class: Callable[[], type]) -> DatasetFactory:
    """A benchmark split by class-id ranges (``data.train_classes`` / ``data.test_classes``)."""

    def factory(cfg: DataConfig, train_transform: Callable | None, eval_transform: Callable | None):
        cls, kwargs = load_class(), _class_range_kwargs(cfg)
        return cls(_root(cfg), "train", transform=train_transform, **kwargs), cls(
            _root(cfg), "test", transform=eval_transform, **kwargs
        )

    return factory


def _cub_class() -> type:
    from glassmetric.data.cub import CUB200

    return CUB200


def _cars_class() -> type:
    from glassmetric.data.cars import Cars196

    return Cars196


def _sop(cfg: DataConfig, train_transform: Callable | None, eval_transform: Callable | None):
    from glassmetric.data.sop import StanfordOnlineProducts

    return (
        StanfordOnlineProducts(_root(cfg), "train", transform=train_transform),
        StanfordOnlineProducts(_root(cfg), "test", transform=eval_transform),
    )


def _folder_by_positions(cfg: DataConfig, train_transform: Callable | None, eval_transform: Callable | None):
    """One image folder split by ``data.train_classes`` / ``data.test_classes``: 1-based positions
    in its sorted class-folder names (for ``001.<name>`` ... folders, the class ids)."""
    from glassmetric.data.cub import class_range
    from glassmetric.data.folder import ImageFolderDataset, class_folders

    root = _root(cfg)
    names = class_folders(root)
    chosen = []
    for key, value in (("data.train_classes", cfg.train_classes), ("data.test_classes", cfg.test_classes)):
        lo, hi = class_range(value or (), key)
        if lo < 1 or hi > len(names):
            raise ConfigError(
                f"{key}: {value} is outside the {len(names)} class folders of {root} (positions 1-{len(names)})"
            )
        chosen.append(names[lo - 1 : hi])
    return (
        ImageFolderDataset(root, chosen[0], transform=train_transform),
        ImageFolderDataset(root, chosen[1], transform=eval_transform),
    )


def _user_folders(kind: str) -> DatasetFactory:
    """The user's own data: ``data.root`` (training classes) and ``data.test_root`` (test classes),
    each an image folder (``folder``) or a CSV file (``csv``); or one image folder split by class
    positions (``data.train_classes`` and ``data.test_classes``, no test_root)."""

    def factory(cfg: DataConfig, train_transform: Callable | None, eval_transform: Callable | None):
        from glassmetric.data.folder import CSVDataset, ImageFolderDataset

        make = ImageFolderDataset if kind == "folder" else CSVDataset
        if cfg.test_root is None:
            if kind == "folder" and cfg.train_classes is not None and cfg.test_classes is not None:
                return _folder_by_positions(cfg, train_transform, eval_transform)
            also = (
                " (or data.train_classes and data.test_classes to split data.root's classes)"
                if kind == "folder"
                else ""
            )
            raise ConfigError(
                f"data.test_root: data set {kind!r} needs a test_root with the (disjoint) test classes{also}"
            )
        test_root = resolve_data_path(cfg.test_root, "data.test_root")
        return make(_root(cfg), transform=train_transform), make(test_root, transform=eval_transform)

    return factory


#: data set name -> factory: the names ``data.name`` accepts (tests/test_registries.py checks
#: that the config's list is exactly these)
DATASETS: dict[str, DatasetFactory] = {
    "synthetic": _synthetic,
    "cub200": _class_range_benchmark(_cub_class),
    "cars196": _class_range_benchmark(_cars_class),
    "sop": _sop,
    "folder": _user_folders("folder"),
    "csv": _user_folders("csv"),
}


def build_base_splits(cfg: DataConfig, train_transform: Callable | None, eval_transform: Callable | None):
    """(train, test) data sets of the configured benchmark, before validation carving."""
    factory = DATASETS.get(cfg.name)
    if factory is None:
        raise ConfigError(f"data.name: unknown data set {cfg.name!r} (known: {', '.join(DATASETS)})")
    return factory(cfg, train_transform, eval_transform)


def carve_validation(
    train: RetrievalDataset, num_val_classes: int, seed: int, eval_transform: Callable | None
) -> tuple[RetrievalDataset, RetrievalDataset | None]:
    """Hold out ``num_val_classes`` training classes (a seeded random choice) for validation."""
    if num_val_classes == 0:
        return train, None
    classes = train.classes
    if num_val_classes >= len(classes) - 1:
        raise ConfigError(f"data.val_classes: {num_val_classes} leaves too few of the {len(classes)} training classes")
    rng = np.random.default_rng(seed)
    val_classes = np.sort(rng.choice(classes, size=num_val_classes, replace=False))
    is_val = np.isin(train.labels, val_classes)
    return Subset(train, np.flatnonzero(~is_val)), Subset(train, np.flatnonzero(is_val), transform=eval_transform)


def build_gallery(cfg: DataConfig, eval_transform: Callable | None) -> RetrievalDataset | None:
    """The cross-domain gallery of the test classes, when the config asks for one."""
    style = cfg.synthetic.gallery_style
    if cfg.name != "synthetic" or style is None:
        return None
    from glassmetric.data.synthetic import SyntheticParts

    s = cfg.synthetic
    return SyntheticParts(
        "test",
        num_classes=s.num_classes,
        images_per_class=s.images_per_class,
        image_size=cfg.image_size,
        seed=s.seed,
        style=style,
        transform=eval_transform,
    )


def build_splits(
    cfg: DataConfig, train_transform: Callable | None, eval_transform: Callable | None, seed: int = 0
) -> Splits:
    """The splits of ``cfg``, checked to have disjoint train and test classes, each reading
    bad images by ``cfg.on_bad_image``."""
    from glassmetric.data.integrity import check_disjoint_classes

    train, test = build_base_splits(cfg, train_transform, eval_transform)
    extras = [load_extra(entry, f"data.extra_train[{i}]") for i, entry in enumerate(cfg.extra_train)]
    check_disjoint_classes(cfg, train, test, extras)
    if extras:
        root = None if cfg.name == "synthetic" else _root(cfg)
        sources = [TrainingSource("data.root", cfg.name, root, train), *extras]
        train = TrainingUnion(sources, [False] + [e.merge_names for e in cfg.extra_train], train_transform)
    train, val = carve_validation(train, cfg.val_classes, seed, eval_transform)
    splits = Splits(train=train, val=val, test=test, gallery=build_gallery(cfg, eval_transform))
    for dataset in (splits.train, splits.val, splits.test, splits.gallery):
        if dataset is not None:
            dataset.set_bad_image_policy(cfg.on_bad_image)
    return splits


__all__ = ["DATASETS", "Splits", "build_base_splits", "build_splits", "carve_validation", "split_by_classes"]
