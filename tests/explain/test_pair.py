"""`glassmetric explain`: a trained checkpoint, two image files, one figure."""

import pytest
import torch
from PIL import Image
from tiny_runs import fit_tiny, save_test_images

from glassmetric.checkpoints import load_trained
from glassmetric.cli import main
from glassmetric.retriever import Retriever
from glassmetric.similarity.structural import explain_pair


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fit_tiny(tmp_path_factory.mktemp("run"), "model.embedding_dim=16")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return save_test_images(tmp_path_factory.mktemp("images"), (0, 1))


def test_retriever_explains_a_pair_training_free_without_changing_the_model(checkpoint, images):
    retriever = Retriever.from_checkpoint(checkpoint, "cpu")
    pair = retriever.explain(*images)
    e = pair.structural
    assert pair.images[0].size == (64, 64)
    # the original 80 px files travel with the pair for the figures, the grid on their eval crop (all of them)
    assert [o.image.size for o in pair.originals] == [(80, 80), (80, 80)]
    assert pair.originals[0].box == pytest.approx((0, 0, 80, 80))
    assert set(retriever.model.model.extra_heads) == set()  # no head added to the model
    model, _cfg = load_trained(checkpoint)
    # the training-free cells: the global head's linear layer at every location, pooled to 4 x 4, normalised
    x = torch.stack([retriever.transform(Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        out = model(x)
        lin = model.head.linear
        proj = torch.einsum("bchw,dc->bdhw", out.feature_map, lin.weight) + lin.bias[None, :, None, None]
        up = torch.nn.functional.interpolate(proj, size=(16, 16), mode="bilinear", align_corners=False)
        cells = torch.nn.functional.normalize(
            torch.nn.functional.adaptive_avg_pool2d(up, 4).flatten(2).transpose(1, 2), dim=-1
        )
    ot = retriever.settings
    ref = explain_pair(
        x_local=cells[0],
        y_local=cells[1],
        x_global=out.embedding[0],
        y_global=out.embedding[1],
        epsilon=ot.epsilon,
        iters=ot.iters,
        tol=ot.tol,
        marginals=ot.marginals,
    )
    torch.testing.assert_close(e.T, ref.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(e.region_contribution_x.sum(), e.ss, atol=1e-5, rtol=0)
    torch.testing.assert_close(e.score, e.s_global + e.ss)


def test_explain_cli_writes_the_figure(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "figs" / "pair.png"
    assert main(["explain", str(images[0]), str(images[1]), "--checkpoint", str(checkpoint), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "structural" in capsys.readouterr().out


def test_explain_cli_names_a_missing_image(checkpoint, images, tmp_path, capsys):
    assert main(["explain", str(images[0]), str(tmp_path / "missing.jpg"), "--checkpoint", str(checkpoint)]) == 2
    assert "missing.jpg" in capsys.readouterr().err


def test_eval_rerank_sweep_and_correspondence(checkpoint, tmp_path):
    plain, swept = tmp_path / "plain.json", tmp_path / "swept.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--device", "cpu", "--out", str(plain)]) == 0
    args = [
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--device",
        "cpu",
        "--rerank",
        "structural",
        "--k",
        "0,3,10",
        "--correspondence",
        "12",
        "--out",
        str(swept),
    ]
    assert main(args) == 0
    import json

    report = json.loads(swept.read_text())
    assert set(report["rerank"]) == {"0", "3", "10"}
    global_metrics = json.loads(plain.read_text())["metrics"]
    for key, value in report["rerank"]["0"].items():  # K = 0 is the plain global ranking
        assert value == pytest.approx(global_metrics[key], abs=1e-9)
    corr = report["correspondence"]
    assert corr["n_pairs"] > 0 and corr["uniform"] == pytest.approx(1 / 16)
    assert 0.0 <= corr["learned"] <= corr["upper_bound"] <= 1.0


def test_eval_rejects_bad_k(checkpoint, capsys):
    assert main(["eval", "--checkpoint", str(checkpoint), "--rerank", "structural", "--k", "5,x"]) == 2
    assert "--k" in capsys.readouterr().err
