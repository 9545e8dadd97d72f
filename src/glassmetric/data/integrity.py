"""Protocol checks on built splits: the zero-shot test classes are never training classes.

Every protocol glassmetric ships (CUB-200, Cars196, SOP, the embedded data, class folders and
CSV lists with a separate test root) evaluates on classes that training never saw, so a test
class that is also a training class is refused: the retrieval metrics would measure memory,
not generalisation. Folder and CSV data sets number their classes per root, so their classes
are compared by name; the others by label.
"""

from __future__ import annotations

from glassmetric.config import DataConfig
from glassmetric.data.base import RetrievalDataset
from glassmetric.errors import ConfigError


def _class_keys(dataset: RetrievalDataset) -> set:
    names = getattr(dataset, "class_names", None)
    if names is not None:
        return {names[int(c)] for c in dataset.classes}
    return {int(c) for c in dataset.classes}


def _few(values: set) -> str:
    shown = sorted(values, key=str)[:8]
    return ", ".join(map(str, shown)) + (f", ... ({len(values)} in all)" if len(values) > 8 else "")


def check_disjoint_classes(cfg: DataConfig, train: RetrievalDataset, test: RetrievalDataset) -> None:
    """Raise a ConfigError naming the keys when the training and test classes overlap."""
    shared = _class_keys(train) & _class_keys(test)
    if not shared:
        return
    if cfg.name in ("folder", "csv"):
        where = f"data.test_root ({cfg.test_root}) and data.root ({cfg.root}) share the classes"
    elif cfg.train_classes is not None or cfg.test_classes is not None:
        where = f"data.train_classes {cfg.train_classes} and data.test_classes {cfg.test_classes} share the classes"
    else:
        where = f"the train and test splits of {cfg.name!r} share the classes"
    raise ConfigError(f"{where} {_few(shared)}: the zero-shot protocol tests on classes never trained on")
