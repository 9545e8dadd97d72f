"""The real-data presets read their data from ${GLASSMETRIC_DATA_ROOT}: generated stand-ins for
cub50 (CUB-200-2011 layout, classes 1-50), cub2010_51_100 and cars_1_98 (class folders) give
the splits each preset promises; without the variable the error says what to set."""

import numpy as np
import pytest
from fixtures import write_cub, write_image

from glassmetric.config import load_config
from glassmetric.data.registry import build_splits
from glassmetric.errors import ConfigError


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    write_cub(tmp_path / "cub50", images_per_class=(2,) * 50)
    for c in range(51, 56):  # a few of the CUB-200-2010 species 51-100
        for k in range(2):
            write_image(tmp_path / "cub2010_51_100" / f"{c:03d}.Species_{c}" / f"{k}.jpg", seed=k)
    for c in range(1, 99):
        write_image(tmp_path / "cars_1_98" / f"{c:03d}.Make_Model_{c}" / "0.jpg", seed=c)
        write_image(tmp_path / "cars_1_98" / f"{c:03d}.Make_Model_{c}" / "1.jpg", seed=c + 100)
    monkeypatch.setenv("GLASSMETRIC_DATA_ROOT", str(tmp_path))
    return tmp_path


def test_cub75_trains_on_cub_1_to_25_and_the_2010_species_and_tests_on_26_to_50(data_root):
    splits = build_splits(load_config("cub75").data, None, None)
    train_and_val = {*splits.train.labels, *splits.val.labels}
    names = splits.train.base.class_names
    assert sorted(names[c] for c in train_and_val) == [f"{c:03d}.Bird_{c}" for c in range(1, 26)] + [
        f"{c:03d}.Species_{c}" for c in range(51, 56)
    ]
    assert len(set(splits.val.labels)) == 10 and not set(splits.val.labels) & set(splits.train.labels)
    assert sorted(set(splits.test.labels)) == list(range(26, 51))
    assert len(splits.train) + len(splits.val) == 2 * 30 and len(splits.test) == 2 * 25


def test_cars98_splits_its_class_folders_1_to_49_and_50_to_98(data_root):
    splits = build_splits(load_config("cars98").data, None, None)
    train_names = {splits.train.base.class_names[c] for c in {*splits.train.labels, *splits.val.labels}}
    assert train_names == {f"{c:03d}.Make_Model_{c}" for c in range(1, 50)}
    assert set(splits.test.class_names) == {f"{c:03d}.Make_Model_{c}" for c in range(50, 99)}
    assert len(set(splits.val.labels)) == 10
    assert np.bincount(splits.test.labels).tolist() == [2] * 49


@pytest.mark.parametrize("preset", ["cub50", "cub75", "cars98"])
def test_without_the_variable_the_error_says_what_to_set(preset, monkeypatch):
    monkeypatch.delenv("GLASSMETRIC_DATA_ROOT", raising=False)
    cfg = load_config(preset)
    with pytest.raises(
        ConfigError,
        match=r"^data\.root: \$\{GLASSMETRIC_DATA_ROOT\}/\w+ needs the environment variable GLASSMETRIC_DATA_ROOT .*set data\.root to",
    ):
        build_splits(cfg.data, None, None)


def test_data_root_overrides_the_variable(data_root, monkeypatch):
    monkeypatch.delenv("GLASSMETRIC_DATA_ROOT", raising=False)
    cfg = load_config("cars98", [f"data.root={data_root / 'cars_1_98'}"])
    assert len(build_splits(cfg.data, None, None).test) == 2 * 49


def test_folder_positions_outside_the_class_folders_are_refused(data_root):
    cfg = load_config("cars98", ["data.test_classes=[50, 99]"])
    with pytest.raises(
        ConfigError,
        match=r"^data\.test_classes: \(50, 99\) is outside the 98 class folders of .*cars_1_98 \(positions 1-98\)$",
    ):
        build_splits(cfg.data, None, None)
    overlapping = load_config("cars98", ["data.train_classes=[1, 50]"])
    with pytest.raises(
        ConfigError,
        match=r"^data\.train_classes \(1, 50\) and data\.test_classes \(50, 98\) share the classes 050\.Make_Model_50:",
    ):
        build_splits(overlapping.data, None, None)
