"""Protocol checks on built splits: the zero-shot test classes are never training classes.

Every protocol glassmetric ships (CUB-200, Cars196, SOP, the embedded data, class folders and
CSV lists with a separate test root) evaluates on classes that training never saw, so a test
class that is also a training class is refused: the retrieval metrics would measure memory,
not generalisation. Folder and CSV data sets number their classes per root, so their classes
are compared by name; the others by label.

Every extra training set (``data.extra_train``) is checked against the test classes too: by
name where both have names, and by id where it has the test data set's layout (CUB-200,
Cars196, SOP: their class ids mean the same class in every copy of the data set).
"""

from __future__ import annotations

from collections.abc import Sequence

from glassmetric.config import DataConfig
from glassmetric.data.base import RetrievalDataset
from glassmetric.data.union import ID_KINDS, TrainingSource, class_name
from glassmetric.errors import ConfigError


def _class_keys(dataset: RetrievalDataset) -> set:
    names = getattr(dataset, "class_names", None)
    if names is not None:
        return {names[int(c)] for c in dataset.classes}
    return {int(c) for c in dataset.classes}


def _few(values: set) -> str:
    shown = sorted(values, key=str)[:8]
    return ", ".join(map(str, shown)) + (f", ... ({len(values)} in all)" if len(values) > 8 else "")


def _names(dataset: RetrievalDataset) -> set[str]:
    names = {class_name(dataset, int(c)) for c in dataset.classes}
    return set() if None in names else {n for n in names if n is not None}


def _check_extra(source: TrainingSource, test_kind: str, test: RetrievalDataset) -> None:
    """Raise a ConfigError naming ``source`` when it has a test class, by name or by id."""
    for how, shared in (
        ("by name", _names(source.dataset) & _names(test)),
        (
            "by id",
            {int(c) for c in source.dataset.classes} & {int(c) for c in test.classes}
            if source.kind == test_kind and source.kind in ID_KINDS
            else set(),
        ),
    ):
        if shared:
            raise ConfigError(
                f"{source.describe()} and the test split share the classes {_few(shared)} ({how}): "
                "the zero-shot protocol tests on classes never trained on"
            )


def check_disjoint_classes(
    cfg: DataConfig, train: RetrievalDataset, test: RetrievalDataset, extras: Sequence[TrainingSource] = ()
) -> None:
    """Raise a ConfigError naming the keys when the training classes (of ``data.root`` and of
    every extra training set) and the test classes overlap."""
    shared = _class_keys(train) & _class_keys(test)
    if not shared:
        for source in extras:
            _check_extra(source, cfg.name, test)
        return
    if cfg.train_classes is not None or cfg.test_classes is not None:
        where = f"data.train_classes {cfg.train_classes} and data.test_classes {cfg.test_classes} share the classes"
    elif cfg.name in ("folder", "csv"):
        where = f"data.test_root ({cfg.test_root}) and data.root ({cfg.root}) share the classes"
    else:
        where = f"the train and test splits of {cfg.name!r} share the classes"
    raise ConfigError(f"{where} {_few(shared)}: the zero-shot protocol tests on classes never trained on")
