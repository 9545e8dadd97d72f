"""Protocol checks: overlapping train / test classes are refused, a short kNN is warned about."""

import warnings

import pytest
import torch
from fixtures import write_cub, write_image

from glassmetric.config import load_config
from glassmetric.data.registry import build_splits
from glassmetric.errors import ConfigError
from glassmetric.retrieval.metrics import KnnDepthWarning, retrieval_metrics


def test_overlapping_class_ranges_are_refused(tmp_path):
    cub = write_cub(tmp_path / "CUB_200_2011")  # classes 1-4
    ok = load_config(
        None, ["data.name=cub200", f"data.root={cub.root}", "data.train_classes=[1, 2]", "data.test_classes=[3, 4]"]
    )
    build_splits(ok.data, None, None)
    bad = load_config(
        None, ["data.name=cub200", f"data.root={cub.root}", "data.train_classes=[1, 3]", "data.test_classes=[3, 4]"]
    )
    with pytest.raises(ConfigError) as e:
        build_splits(bad.data, None, None)
    message = str(e.value)
    assert (
        "data.train_classes (1, 3) and data.test_classes (3, 4) share the classes 003.Bird_3:" in message
        and "\n" not in message
    )


def test_folders_sharing_a_class_name_are_refused(tmp_path):
    for root, classes in (("train", ["gull", "tern", "wren"]), ("test", ["crow", "wren"])):
        for c in classes:
            for i in range(2):
                write_image(tmp_path / root / c / f"{i}.png", seed=i)
    cfg = load_config(
        None, ["data.name=folder", f"data.root={tmp_path / 'train'}", f"data.test_root={tmp_path / 'test'}"]
    )
    with pytest.raises(ConfigError, match=r"data.test_root .* share the classes wren: the zero-shot protocol"):
        build_splits(cfg.data, None, None)
    (tmp_path / "test" / "wren" / "0.png").rename(tmp_path / "test" / "crow" / "2.png")
    (tmp_path / "test" / "wren" / "1.png").unlink()
    (tmp_path / "test" / "wren").rmdir()
    splits = build_splits(cfg.data, None, None)  # disjoint by name; labels 0.. in each root are no overlap
    assert splits.test.class_names == ("crow",)


def _clusters(sizes, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    centres = torch.randn(len(sizes), dim, generator=g)
    x = centres[labels] + 0.8 * torch.randn(len(labels), dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1), labels


def test_a_knn_shorter_than_the_largest_class_warns_and_undercounts():
    x, y = _clusters([3, 4, 12, 5])  # largest class: R = 11 other items
    exact = retrieval_metrics(x, y, include=("recall", "r_precision", "map_at_r"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # k >= R: no warning
        assert retrieval_metrics(x, y, include=("recall", "r_precision", "map_at_r"), max_k=11) == exact
    with pytest.warns(KnnDepthWarning, match=r"k=8 neighbours per query, fewer than the largest class \(R up to 11\)"):
        short = retrieval_metrics(x, y, include=("recall", "r_precision", "map_at_r"), max_k=5)  # raised to recall@8
    assert {k: v for k, v in short.items() if k.startswith("recall")} == {
        k: v for k, v in exact.items() if k.startswith("recall")
    }
    assert short["map_at_r"] < exact["map_at_r"] and short["r_precision"] <= exact["r_precision"]


def test_eval_knn_k_is_validated():
    assert load_config(None, ["eval.knn_k=50"]).eval.knn_k == 50
    with pytest.raises(ConfigError, match=r"eval\.knn_k"):
        load_config(None, ["eval.knn_k=0"])
