"""`glassmetric explain` on a grouping checkpoint: per-group cosines that sum to the score, a figure."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_runs import fit_tiny, save_test_images

from glassmetric.cli import main
from glassmetric.explain.figures import group_pair_figure, save_figure
from glassmetric.explain.groups import explain_groups
from glassmetric.models.output import EmbeddingOutput
from glassmetric.retriever import Retriever


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fit_tiny(tmp_path_factory.mktemp("run"), "model.embedding_dim=12", "model.groups=3")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return save_test_images(tmp_path_factory.mktemp("images"), (0, 5))


def test_group_contributions_sum_to_the_reported_score():
    torch.manual_seed(0)
    g = F.normalize(torch.randn(2, 4, 5), dim=-1)
    out = EmbeddingOutput(embedding=g.flatten(1) / 2.0, group_embeddings=g, attention=torch.rand(2, 4, 3, 3))
    e = explain_groups(out, out, 0, 1)
    expected = [float(F.cosine_similarity(g[0, i], g[1, i], dim=0)) for i in range(4)]
    assert e.group_similarity.tolist() == pytest.approx(expected)
    assert float(e.contribution.sum()) == pytest.approx(float(e.score))
    assert float(e.score) == pytest.approx(
        float(F.cosine_similarity(out.embedding[0], out.embedding[1], dim=0)), abs=1e-6
    )


def test_retriever_explains_a_pair_over_groups_and_draws_the_figure(checkpoint, images, tmp_path):
    pair = Retriever.from_checkpoint(checkpoint, "cpu").explain(*images)
    e = pair.groups
    assert e.groups == 3 and e.attention_x.shape == (3, 2, 2)
    torch.testing.assert_close(e.attention_x.sum((1, 2)), torch.ones(3, dtype=torch.float64))
    assert float(e.contribution.sum()) == pytest.approx(float(e.score), abs=1e-6)
    fig = group_pair_figure(*pair.originals, e)
    assert len(fig.axes) == 2 * (1 + 3) + 1  # images and group panels, colour bar
    assert fig.axes[0].images[0].get_array().shape == (80, 80, 3)  # the 80 px files, not the 64 px input
    assert "score" in fig._suptitle.get_text()
    path = save_figure(fig, tmp_path / "g.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explain_cli_draws_the_group_figure_and_prints_the_sum(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "pair.png"
    assert main(["explain", str(images[0]), str(images[1]), "--checkpoint", str(checkpoint), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    line = capsys.readouterr().out.splitlines()[0]
    score, parts = line.split(" = (")
    cosines = [float(v) for v in parts.split(")")[0].split(" + ")]
    assert len(cosines) == 3 and float(score.split()[1]) == pytest.approx(sum(cosines) / 3, abs=2e-3)
    assert math.isfinite(float(score.split()[1]))


def test_eval_cli_reports_group_distinctness(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert (
        main(["eval", "--checkpoint", str(checkpoint), "--groups-parts", "12", "--device", "cpu", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "region IoU" in printed and "group 3: attention peak nearest the" in printed
    report = json.loads(out.read_text())["group_parts"]
    assert report["n_images"] == 12 and set(report["groups"]) == {"1", "2", "3"}
    assert "mutual information between group and part" in printed and report["mi"] >= 0
    figure = tmp_path / "groups.png"
    assert main(["eval", "--checkpoint", str(checkpoint), "--groups-parts", "12", "--groups-figure", str(figure)]) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
    assert main(["eval", "--checkpoint", str(checkpoint), "--groups-parts", "4", "--groups-fraction", "0"]) == 2
    assert "--groups-fraction" in capsys.readouterr().err
