"""Training on a union of labelled sets: ``data.root``'s training classes plus every
``data.extra_train`` entry (image folders, CSV lists, or the CUB-200, Cars196 and SOP layouts).

Classes are told apart by name across sets. A name that two sets share is an error unless the
later entry says ``merge_names: true``, then its images join that class: two folders of
``gull`` from different sources are one class only when the config says so. Classes without
names (SOP's ids, the embedded synthetic data) are never merged. The union numbers its classes
0, 1, ... in the order of the sets, each set's classes in their own order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glassmetric.config import ExtraTrainConfig
from glassmetric.data.base import RetrievalDataset, Sample
from glassmetric.data.paths import resolve_data_path
from glassmetric.errors import ConfigError

#: layouts whose class ids mean the same class in every copy of the data set (compared by id
#: across sets, besides by name)
ID_KINDS = frozenset({"cub200", "cars196", "sop", "synthetic"})


@dataclass
class TrainingSource:
    """One labelled set of the training union: the config key that named it, its layout, its
    resolved root (None for the synthetic data) and its images (training classes only)."""

    key: str
    kind: str
    root: Path | None
    dataset: RetrievalDataset

    def describe(self) -> str:
        return self.key if self.root is None else f"{self.key} ({self.root})"


def class_name(dataset: RetrievalDataset, label: int) -> str | None:
    """The name of class ``label`` of ``dataset``, or None when its classes have no names."""
    names = getattr(dataset, "class_names", None)
    if names is None:
        return None
    return str(names[int(label)])


def detect_kind(root: Path) -> str:
    """The layout under ``root``: cub200 (images.txt + classes.txt), cars196 (cars_annos.mat),
    sop (Ebay_train.txt), csv (a .csv file), else folder (a sub-folder per class)."""
    if root.is_file():
        return "csv"
    if (root / "images.txt").is_file() and (root / "classes.txt").is_file():
        return "cub200"
    if (root / "cars_annos.mat").is_file():
        return "cars196"
    if (root / "Ebay_train.txt").is_file():
        return "sop"
    return "folder"


def load_extra(entry: ExtraTrainConfig, key: str) -> TrainingSource:
    """The images of one ``data.extra_train`` entry (without transform: the union applies it)."""
    root = resolve_data_path(entry.root or "", f"{key}.root")
    kind = detect_kind(root) if entry.kind == "auto" else entry.kind
    if entry.classes is not None and kind not in ("cub200", "cars196"):
        raise ConfigError(f"{key}.classes: a class-id range needs a cub200 or cars196 layout, {root} is {kind}")
    dataset: RetrievalDataset
    if kind in ("cub200", "cars196"):
        from glassmetric.data.cars import Cars196
        from glassmetric.data.cub import CUB200

        official: type[CUB200] | type[Cars196] = CUB200 if kind == "cub200" else Cars196
        dataset = (
            official(root, "all") if entry.classes is None else official(root, "train", train_classes=entry.classes)
        )
    elif kind == "sop":
        from glassmetric.data.sop import StanfordOnlineProducts

        dataset = StanfordOnlineProducts(root, "train")
    elif kind == "csv":
        from glassmetric.data.folder import CSVDataset

        dataset = CSVDataset(root)
    else:
        from glassmetric.data.folder import ImageFolderDataset

        dataset = ImageFolderDataset(root)
    return TrainingSource(key, kind, root, dataset)


class TrainingUnion(RetrievalDataset):
    """The images of several training sources under one label space (see the module doc).

    ``class_names[c]`` names union class ``c`` (``<key>:<id>`` for a class without a name);
    ``source_of`` is each image's source index and ``source_labels`` its label in that source.
    """

    def __init__(
        self, sources: Sequence[TrainingSource], merge: Sequence[bool], transform: Callable | None = None
    ) -> None:
        super().__init__(transform)
        self.sources = list(sources)
        names: list[str] = []
        index_of_name: dict[str, int] = {}
        owner: dict[str, str] = {}
        labels, source_of, source_labels, positions = [], [], [], []
        for s, (source, merging) in enumerate(zip(self.sources, merge, strict=True)):
            mapping: dict[int, int] = {}
            for c in source.dataset.classes:
                name = class_name(source.dataset, int(c))
                if name is None:
                    mapping[int(c)] = len(names)
                    names.append(f"{source.key}:{int(c)}")
                    continue
                if name in index_of_name:
                    if not merging:
                        raise ConfigError(
                            f"{source.key}: class {name!r} is also a class of {owner[name]}; "
                            f"set {source.key}.merge_names=true if they are the same class, else rename one"
                        )
                    mapping[int(c)] = index_of_name[name]
                    continue
                index_of_name[name] = mapping[int(c)] = len(names)
                owner[name] = source.key
                names.append(name)
            own = source.dataset.labels
            labels.append(np.array([mapping[int(y)] for y in own], dtype=np.int64))
            source_of.append(np.full(len(own), s, dtype=np.int64))
            source_labels.append(own.astype(np.int64))
            positions.append(np.arange(len(own), dtype=np.int64))
        self.class_names = tuple(names)
        self.labels = np.concatenate(labels)
        self.source_of = np.concatenate(source_of)
        self.source_labels = np.concatenate(source_labels)
        self._positions = np.concatenate(positions)

    def load(self, index: int) -> Sample:
        s = int(self.source_of[index])
        sample = self.sources[s].dataset.load(int(self._positions[index]))
        sample.label = int(self.labels[index])
        sample.meta = {**sample.meta, "source": self.sources[s].key, "source_label": int(self.source_labels[index])}
        return sample
