"""Uncertainty against retrieval failure: brute-force AUROC and nearest neighbours."""

import numpy as np
import pytest
import torch
from PIL import Image

from glassmetric.explain.uncertainty import extremes, uncertainty_grid_figure
from glassmetric.retrieval.uncertainty import auroc, uncertainty_vs_failure, write_csv


def brute_auroc(scores, positive):
    """P(score of a random positive > score of a random negative), ties count half."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1])
def test_auroc_matches_pair_counting(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=40), 1)  # with ties
    positive = rng.random(40) < 0.4
    assert auroc(scores, positive) == pytest.approx(brute_auroc(scores, positive))
    assert np.isnan(auroc(scores, np.ones(40, bool)))


def test_report_nearest_neighbours_and_halves():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat_interleave(5)
    x = torch.nn.functional.normalize(
        torch.randn(6, 8, generator=g)[labels] + 0.9 * torch.randn(30, 8, generator=g), dim=1
    )
    u = torch.rand(30, generator=g)
    rep = uncertainty_vs_failure(u, x, labels)
    sims = x @ x.T
    sims.fill_diagonal_(-2)
    nn_brute = sims.argmax(1)
    assert rep.neighbour.tolist() == nn_brute.tolist()
    correct = (labels[nn_brute] == labels).numpy()
    assert rep.correct.tolist() == correct.tolist()
    assert rep.auroc == pytest.approx(brute_auroc(u.tolist(), (~correct).tolist()))
    order = np.argsort(u.numpy())
    assert rep.recall_at_1_certain_half == pytest.approx(correct[order[:15]].mean())
    assert rep.recall_at_1_uncertain_half == pytest.approx(correct[order[15:]].mean())


def test_report_with_a_separate_gallery_and_csv(tmp_path):
    q, g = torch.eye(3), torch.eye(3)[[1, 0, 2]]
    rep = uncertainty_vs_failure(torch.tensor([0.1, 0.5, 0.9]), q, torch.tensor([0, 1, 2]), g, torch.tensor([1, 0, 5]))
    assert rep.neighbour.tolist() == [1, 0, 2] and rep.correct.tolist() == [True, True, False]
    write_csv(rep, tmp_path / "u.csv")
    lines = (tmp_path / "u.csv").read_text().splitlines()
    assert lines[0].startswith("index,name,label,uncertainty") and lines[3].endswith(",2,0")


def test_extremes_and_grid_figure(tmp_path):
    u = np.array([0.3, 0.9, 0.1, 0.5, 0.7, 0.2])
    most, least = extremes(u, 2)
    assert most.tolist() == [1, 4] and least.tolist() == [2, 5]
    img = np.zeros((16, 16, 3), np.uint8)
    fig = uncertainty_grid_figure([img] * 2, u[most], [True, False], [img] * 2, u[least], [True, True], columns=3)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["\u2713 u = 0.9", "\u2717 u = 0.7", "\u2713 u = 0.1", "\u2713 u = 0.2"]
    from glassmetric.explain.figures import save_figure

    assert save_figure(fig, tmp_path / "grid.png").stat().st_size > 1000


def test_object_statistics_and_spearman_against_ranks():
    from scipy.stats import rankdata

    from glassmetric.data.synthetic import SyntheticParts
    from glassmetric.retrieval.uncertainty import object_statistics, uncertainty_vs_ground_truth

    data = SyntheticParts("test", num_classes=3, images_per_class=4, image_size=64)
    stats = object_statistics(data)
    for i in range(len(data)):
        s = data.load(i)
        assert stats["box_area_share"][i] == pytest.approx(s.bbox[2] * s.bbox[3] / (64 * 64))
        assert stats["visible_parts"][i] == (s.keypoints[:, 2] > 0).sum()
    u = np.random.default_rng(0).normal(size=len(data))
    out = uncertainty_vs_ground_truth(u, {"a": stats["box_area_share"], "const": np.ones(len(data))})
    ru, ra = rankdata(u), rankdata(stats["box_area_share"])
    assert out["a"]["rho"] == pytest.approx(np.corrcoef(ru, ra)[0, 1]) and out["a"]["n"] == len(data)
    assert np.isnan(out["const"]["rho"])  # a constant has no ranks


def test_object_statistics_without_boxes():
    from glassmetric.data.base import RetrievalDataset, Sample
    from glassmetric.retrieval.uncertainty import object_statistics

    class NoBoxes(RetrievalDataset):
        def __init__(self):
            super().__init__()
            self.labels = np.zeros(2, dtype=np.int64)

        def load(self, i):
            return Sample(image=Image.new("RGB", (8, 8)), label=0)

    assert object_statistics(NoBoxes()) is None


# --------------------------------------------------------------------------- unreadable images


def _with_a_bad_image(policy):
    """The embedded data (boxes and part keypoints) with image 5 unreadable."""
    from glassmetric.data.synthetic import SyntheticParts
    from glassmetric.errors import DataError

    class WithABadImage(SyntheticParts):
        def load(self, i):
            if i == 5:
                raise DataError("cannot read image /data/bad five.png: truncated")
            return super().load(i)

    data = WithABadImage("test", num_classes=3, images_per_class=4, image_size=64)
    data.set_bad_image_policy(policy)
    return data


def test_object_statistics_follow_the_indices_and_the_skip_policy():
    from glassmetric.errors import DataError
    from glassmetric.retrieval.uncertainty import object_statistics

    data = _with_a_bad_image("skip")
    stats = object_statistics(data, [7, 5, 0])
    for row, i in ((0, 7), (2, 0)):
        s = data.load(i)
        assert stats["box_area_share"][row] == pytest.approx(s.bbox[2] * s.bbox[3] / (64 * 64))
        assert stats["visible_parts"][row] == (s.keypoints[:, 2] > 0).sum()
    assert np.isnan(stats["box_area_share"][1]) and np.isnan(stats["visible_parts"][1])
    with pytest.raises(DataError, match=r"bad five\.png"):
        object_statistics(_with_a_bad_image("error"), [0, 5])


def test_an_uncertainty_report_names_the_images_it_kept(tmp_path):
    """Under skip the unreadable image is left out, and the report's index and neighbours are
    data-set positions, brute-force checked against the embeddings of the readable images."""
    from glassmetric.models.output import EmbeddingOutput
    from glassmetric.retrieval.uncertainty import evaluate_uncertainty, object_statistics

    class Colour(torch.nn.Module):  # embedding: the mean colour; uncertainty: its spread
        def forward(self, x):
            mean = x.mean((2, 3))
            return EmbeddingOutput(embedding=torch.nn.functional.normalize(mean, dim=1), uncertainty=x.std((2, 3)))

    from torchvision.transforms.functional import to_tensor

    data = _with_a_bad_image("skip")
    data.transform = to_tensor
    rep = evaluate_uncertainty(Colour(), data, batch_size=4)
    kept = [i for i in range(len(data)) if i != 5]
    assert rep.index.tolist() == kept and len(rep.uncertainty) == len(kept)
    emb = torch.stack([torch.nn.functional.normalize(to_tensor(data.load(i).image).mean((1, 2)), dim=0) for i in kept])
    sims = emb @ emb.T
    sims.fill_diagonal_(-float("inf"))
    assert rep.neighbour.tolist() == [kept[j] for j in sims.argmax(1).tolist()]
    assert rep.labels.tolist() == [int(data.labels[i]) for i in kept]
    stats = object_statistics(data, rep.index)
    assert len(stats["box_area_share"]) == len(rep.uncertainty)
    assert np.isfinite(stats["box_area_share"]).all()
    csv = tmp_path / "u.csv"
    write_csv(rep, csv)
    rows = csv.read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == kept
