"""Training on a union of labelled sets (data.extra_train): counts, labels, name clashes, the
zero-shot check against every set, and errors that name the entry."""

from pathlib import Path

import numpy as np
import pytest
from fixtures import write_cars, write_cub, write_image, write_sop

from glassmetric.config import load_config
from glassmetric.data.registry import build_splits
from glassmetric.data.union import detect_kind
from glassmetric.errors import ConfigError


def write_folder(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        for k in range(count):
            write_image(root / name / f"{k}.png", seed=k)
    return root


def cub_config(cub_root: Path, *extra: str):
    """CUB fixture classes 1-2 train, 3-4 test, plus overrides."""
    return load_config(
        None,
        [
            "data.name=cub200",
            f"data.root={cub_root}",
            "data.train_classes=[1, 2]",
            "data.test_classes=[3, 4]",
            *extra,
        ],
    )


def test_a_folder_joins_the_official_layout_with_distinct_labels(tmp_path):
    cub = write_cub(tmp_path / "cub", images_per_class=(3, 2, 3, 2))
    folder = write_folder(tmp_path / "more", {"gull": 2, "tern": 4, "wren": 3})
    cfg = cub_config(cub.root, f"data.extra_train=[{{root: {folder}}}]")
    splits = build_splits(cfg.data, None, None)
    train = splits.train
    assert len(train) == 3 + 2 + 2 + 4 + 3 and len(splits.test) == 3 + 2
    assert len(train.classes) == 5 and sorted(set(train.labels)) == [0, 1, 2, 3, 4]
    # every image's union label names the class folder it was read from (CUB: images/<class>/...)
    for i in range(len(train)):
        sample = train.load(i)
        assert sample.label == train.labels[i]
        assert Path(sample.meta["path"]).parent.name == train.class_names[sample.label]
    sources = [train.load(i).meta["source"] for i in range(len(train))]
    assert sources.count("data.root") == 5 and sources.count("data.extra_train[0]") == 9


def test_validation_classes_are_carved_from_every_training_set(tmp_path):
    cub = write_cub(tmp_path / "cub", images_per_class=(2, 2, 2, 2))
    folder = write_folder(tmp_path / "more", {f"bird_{k}": 2 for k in range(6)})
    cfg = cub_config(cub.root, f"data.extra_train=[{{root: {folder}, kind: folder}}]", "data.val_classes=3")
    union_classes = set(range(8))
    seen_sources = set()
    for seed in range(6):
        splits = build_splits(cfg.data, None, None, seed=seed)
        train_classes, val_classes = set(splits.train.labels), set(splits.val.labels)
        assert len(val_classes) == 3 and train_classes | val_classes == union_classes
        assert not train_classes & val_classes
        seen_sources |= {splits.val.load(i).meta["source"] for i in range(len(splits.val))}
    assert seen_sources == {"data.root", "data.extra_train[0]"}


def test_the_official_layouts_join_by_kind_and_class_range(tmp_path):
    cub = write_cub(tmp_path / "cub", images_per_class=(2, 2, 2, 2))
    cars = write_cars(tmp_path / "cars", images_per_class=(2, 3, 2, 2))
    sop = write_sop(tmp_path / "sop")
    cfg = cub_config(
        cub.root,
        f"data.extra_train=[{{root: {cars.root}, kind: cars196, classes: [2, 3]}}, {{root: {sop.root}}}]",
    )
    train = build_splits(cfg.data, None, None).train
    # CUB 1-2 (4 images), Cars 2-3 (5 images), SOP's training file (classes 1-3, 7 images)
    assert len(train) == 4 + 5 + 7 and len(train.classes) == 2 + 2 + 3
    assert train.class_names[2:4] == ("Make Model 2 2002", "Make Model 3 2003")
    assert train.class_names[4:] == ("data.extra_train[1]:1", "data.extra_train[1]:2", "data.extra_train[1]:3")


def test_kinds_are_detected_from_the_files(tmp_path):
    (tmp_path / "list.csv").write_text("path,label\n")
    assert detect_kind(write_cub(tmp_path / "cub").root) == "cub200"
    assert detect_kind(write_cars(tmp_path / "cars").root) == "cars196"
    assert detect_kind(write_sop(tmp_path / "sop").root) == "sop"
    assert detect_kind(write_folder(tmp_path / "folder", {"a": 1})) == "folder"
    assert detect_kind(tmp_path / "list.csv") == "csv"


def test_a_class_name_in_two_training_sets_is_refused_unless_merged(tmp_path):
    cub = write_cub(tmp_path / "cub", images_per_class=(3, 2, 3, 2))
    folder = write_folder(tmp_path / "more", {"001.Bird_1": 2, "gull": 1})
    cfg = cub_config(cub.root, f"data.extra_train=[{{root: {folder}}}]")
    with pytest.raises(ConfigError) as e:
        build_splits(cfg.data, None, None)
    assert str(e.value) == (
        "data.extra_train[0]: class '001.Bird_1' is also a class of data.root; "
        "set data.extra_train[0].merge_names=true if they are the same class, else rename one"
    )
    merged = build_splits(
        cub_config(cub.root, f"data.extra_train=[{{root: {folder}, merge_names: true}}]").data, None, None
    )
    assert len(merged.train.classes) == 3  # 001.Bird_1 (3 + 2 images), 002.Bird_2, gull
    assert np.bincount(merged.train.labels).tolist() == [5, 2, 1]


def test_an_extra_set_with_a_test_class_name_is_refused(tmp_path):
    cub = write_cub(tmp_path / "cub", images_per_class=(2, 2, 2, 2))
    folder = write_folder(tmp_path / "more", {"gull": 2, "004.Bird_4": 2})
    cfg = cub_config(cub.root, f"data.extra_train=[{{root: {folder}}}]")
    with pytest.raises(ConfigError) as e:
        build_splits(cfg.data, None, None)
    assert str(e.value) == (
        f"data.extra_train[0] ({folder}) and the test split share the classes 004.Bird_4 (by name): "
        "the zero-shot protocol tests on classes never trained on"
    )


def test_an_extra_copy_of_the_test_data_set_is_refused_by_class_id(tmp_path):
    cub = write_cub(tmp_path / "cub", images_per_class=(2, 2, 2, 2))
    copy = write_cub(tmp_path / "copy", images_per_class=(2, 2, 2, 2))
    # the same data set with renamed classes: the names differ, the ids still mean the same species
    (copy.root / "classes.txt").write_text("".join(f"{c} species_{c}\n" for c in range(1, 5)))
    cfg = cub_config(cub.root, f"data.extra_train=[{{root: {copy.root}, kind: cub200, classes: [2, 3]}}]")
    with pytest.raises(
        ConfigError, match=r"^data\.extra_train\[0\] \(.*copy\) and the test split share the classes 3 \(by id\)"
    ):
        build_splits(cfg.data, None, None)
    ok = cub_config(cub.root, f"data.extra_train=[{{root: {copy.root}, kind: cub200, classes: [1, 1]}}]")
    assert len(build_splits(ok.data, None, None).train.classes) == 3


def test_extra_training_sets_outside_the_test_layout_are_compared_by_name_only(tmp_path):
    train = write_folder(tmp_path / "train", {"crow": 2, "gull": 2})
    test = write_folder(tmp_path / "test", {"wren": 2, "3": 2})
    sop = write_sop(tmp_path / "sop")  # SOP class ids 1-3: no names, another layout than the test's
    cfg = load_config(
        None,
        [
            "data.name=folder",
            f"data.root={train}",
            f"data.test_root={test}",
            f"data.extra_train=[{{root: {sop.root}}}]",
        ],
    )
    assert len(build_splits(cfg.data, None, None).train.classes) == 5


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            "{root: MISSING}",
            r"^data\.extra_train\[1\]\.root: .*missing not found; set data\.extra_train\[1\]\.root to where it is$",
        ),
        (
            "{root: '${GLASSMETRIC_TEST_UNSET}/x'}",
            r"^data\.extra_train\[1\]\.root: \$\{GLASSMETRIC_TEST_UNSET\}/x needs the environment variable GLASSMETRIC_TEST_UNSET",
        ),
        ("{root: FOLDER, kind: cub200}", r"^file not found: .*more/images\.txt$"),
        ("{root: FOLDER, kind: cars196, classes: [1, 2]}", r"cars_annos\.mat"),
    ],
)
def test_errors_name_the_entry_or_its_file(tmp_path, monkeypatch, entry, message):
    monkeypatch.delenv("GLASSMETRIC_TEST_UNSET", raising=False)
    cub = write_cub(tmp_path / "cub", images_per_class=(2, 2, 2, 2))
    folder = write_folder(tmp_path / "more", {"gull": 2})
    entry = entry.replace("MISSING", str(tmp_path / "missing")).replace("FOLDER", str(folder))
    cfg = cub_config(cub.root, f"data.extra_train=[{{root: {folder}}}, {entry}]")
    with pytest.raises(Exception, match=message) as e:
        build_splits(cfg.data, None, None)
    assert "\n" not in str(e.value)


def test_the_union_applies_the_training_transform(tmp_path):
    cub = write_cub(tmp_path / "cub", images_per_class=(2, 2, 2, 2))
    folder = write_folder(tmp_path / "more", {"gull": 2})
    cfg = cub_config(cub.root, f"data.extra_train=[{{root: {folder}}}]")
    splits = build_splits(cfg.data, lambda image: ("train", image.size), lambda image: ("eval", image.size))
    items = [splits.train[i] for i in range(len(splits.train))]
    assert [item["image"][0] for item in items] == ["train"] * 6
    assert [item["label"] for item in items] == [0, 0, 1, 1, 2, 2]
    assert splits.test[0]["image"][0] == "eval"


def test_a_tiny_fit_trains_on_the_union_and_saves_the_entries(tmp_path):
    from tiny_fit import SMALL, TINY_RUN

    from glassmetric.checkpoints import load_trained
    from glassmetric.training.fit import fit

    folder = tmp_path / "more"
    for c in range(3):
        for k in range(6):
            write_image(folder / f"extra_{c}" / f"{k}.png", size=(64, 64), seed=10 * c + k)
    cfg = load_config(
        "demo_scratch",
        [
            *SMALL,
            *TINY_RUN,
            f"trainer.output_dir={tmp_path / 'run'}",
            f"data.extra_train=[{{root: {folder}, kind: folder}}]",
        ],
    )
    result = fit(cfg, run_test=False)
    _, saved = load_trained(result.checkpoint, [])
    assert saved.data.extra_train == cfg.data.extra_train
