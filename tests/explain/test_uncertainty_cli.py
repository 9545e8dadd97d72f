"""Uncertainty for people, from the command line: `eval --uncertainty`, `explain` with IDML
scores, and the cross-domain (photo queries / painting gallery) protocol."""

import json

import numpy as np
import pytest
import tiny_runs
import torch

from glassmetric.checkpoints import load_trained
from glassmetric.cli import main
from glassmetric.config import load_config
from glassmetric.data.registry import build_splits
from glassmetric.data.synthetic import SyntheticParts
from glassmetric.explain.pair import introspective_scores
from glassmetric.retriever import Retriever
from glassmetric.similarity.introspective import IntrospectiveParams, introspective_distance_matrix
from glassmetric.training.fit import fit

TINY = [
    *tiny_runs.TINY,
    "model.embedding_dim=16",
    "model.uncertainty_dim=8",
    "model.pooling=avgmax",
    "loss.similarity=introspective",
    "eval.batch_size=16",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return fit(load_config("demo_scratch", [*TINY, f"trainer.output_dir={out}"]), run_test=False).checkpoint


def test_eval_reports_uncertainty_csv_and_figure(checkpoint, tmp_path, capsys):
    csv, png, out = tmp_path / "u.csv", tmp_path / "u.png", tmp_path / "m.json"
    args = [
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--device",
        "cpu",
        "--uncertainty-csv",
        str(csv),
        "--uncertainty-figure",
        str(png),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "AUROC for R@1 failure" in printed
    report = json.loads(out.read_text())["uncertainty"]
    assert report["n_queries"] == 16 and report["uncertainty_std"] > 0
    rows = csv.read_text().splitlines()
    assert len(rows) == 17
    assert png.stat().st_size > 1000


def test_eval_uncertainty_without_the_head_is_one_line(tmp_path, capsys):
    out = tmp_path / "plain"
    plain = [t for t in TINY if not t.startswith(("model.uncertainty_dim", "loss.similarity"))]
    ckpt = fit(load_config("demo_scratch", [*plain, f"trainer.output_dir={out}"]), run_test=False).checkpoint
    assert main(["eval", "--checkpoint", str(ckpt), "--device", "cpu", "--uncertainty"]) == 2
    assert "no uncertainty head" in capsys.readouterr().err


def test_explain_shows_the_uncertainties_and_both_distances(checkpoint, tmp_path, capsys):
    data = SyntheticParts("test", num_classes=8, images_per_class=4, image_size=64)
    paths = []
    for i in (0, 5):
        paths.append(tmp_path / f"img {i}.png")
        data.load(i).image.save(paths[-1])
    pair = Retriever.from_checkpoint(checkpoint, "cpu").explain(*paths)
    scores = pair.introspective
    assert scores is not None and min(scores.uncertainty) > 0
    assert 0 <= scores.introspective_distance <= scores.semantic_distance <= 4
    assert main(["explain", *map(str, paths), "--checkpoint", str(checkpoint), "-o", str(tmp_path / "p.png")]) == 0
    assert "introspective distance" in capsys.readouterr().out


def test_introspective_scores_match_the_distance():
    s, u = torch.randn(2, 6), torch.randn(2, 3)
    got = introspective_scores(s, u, IntrospectiveParams())
    sn = torch.nn.functional.normalize(s, dim=1)
    assert got.semantic_distance == pytest.approx(float(((sn[0] - sn[1]) ** 2).sum()), rel=1e-5)
    assert got.introspective_distance == pytest.approx(
        float(introspective_distance_matrix(s[:1], u[:1], s[1:], u[1:])), rel=1e-5
    )
    assert got.uncertainty == pytest.approx((float(u[0].norm()), float(u[1].norm())))


def test_cross_domain_splits_share_classes_not_style():
    cfg = load_config(
        "cross_domain", ["data.synthetic.num_classes=8", "data.synthetic.images_per_class=3", "data.val_classes=2"]
    )
    splits = build_splits(cfg.data, None, None)
    assert splits.gallery is not None and splits.gallery.style == "painting" and splits.test.style == "photo"
    assert np.array_equal(np.unique(splits.gallery.labels), np.unique(splits.test.labels))
    photo, painting = np.asarray(splits.test.load(0).image), np.asarray(splits.gallery.load(0).image)
    assert photo.shape == painting.shape and np.abs(photo.astype(int) - painting.astype(int)).mean() > 10
    plain = load_config("demo_scratch")
    assert build_splits(plain.data, None, None).gallery is None


def test_cross_domain_fit_tests_photo_queries_against_the_painting_gallery(tmp_path):
    from glassmetric.factory import make_splits
    from glassmetric.retrieval.evaluate import evaluate_model

    cfg = load_config(
        "cross_domain",
        [t for t in TINY if "synthetic" not in t]
        + ["data.synthetic.num_classes=8", "data.synthetic.images_per_class=4", f"trainer.output_dir={tmp_path}"],
    )
    result = fit(cfg)
    model, trained = load_trained(str(result.checkpoint))
    splits = make_splits(trained, model)
    expected = evaluate_model(model, splits.test, splits.gallery, device="cpu")
    assert result.test_metrics["recall@1"] == pytest.approx(expected["recall@1"])
    assert result.test_metrics["map_at_r"] == pytest.approx(expected["map_at_r"])
