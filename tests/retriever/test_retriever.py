"""Retriever: the fields a model gives, decided without changing it; embed from every kind of
source; search and evaluation against brute force; ``glassmetric embed`` and ``eval --data``."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from glassmetric.cli import main
from glassmetric.errors import ConfigError
from glassmetric.retrieval.metrics import retrieval_metrics
from glassmetric.retriever import Embeddings, Retriever


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(1)
    for c in ("a", "b", "c"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (70, 70, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    return tmp_path / "imgs"


@pytest.fixture
def retriever(make_checkpoint):
    return Retriever.from_checkpoint(make_checkpoint(), "cpu")


def test_fields_are_decided_once_and_the_model_is_not_changed(retriever):
    assert retriever.fields == ("embedding", "local")
    assert len(retriever.model.model.extra_heads) == 0
    assert sum(p.numel() for p in retriever.model.parameters()) == sum(
        p.numel() for p in retriever.model.model.parameters()
    )


def test_embed_accepts_a_folder_files_and_images_alike(retriever, folder):
    e = retriever.embed(folder)
    assert len(e) == 9 and e.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and e.positions.tolist() == list(range(9))
    assert e.paths[4].endswith("b/1.png")
    files = retriever.embed([folder / "b" / "1.png", folder / "c" / "2.png"])
    images = retriever.embed([Image.open(folder / "b" / "1.png"), Image.open(folder / "c" / "2.png")])
    torch.testing.assert_close(files.embedding, e.embedding[[4, 8]], atol=1e-5, rtol=0)
    torch.testing.assert_close(images.local, e.local[[4, 8]], atol=1e-5, rtol=0)


def test_search_is_the_brute_force_ranking_without_the_query_itself(retriever, folder):
    e = retriever.embed(folder)
    sims, _idx = retriever.search(e, k=3)
    scores = e.embedding @ e.embedding.T
    scores.fill_diagonal_(-float("inf"))
    torch.testing.assert_close(sims, scores.topk(3).values, atol=1e-6, rtol=0)


def test_rerank_refuses_embeddings_without_their_local_cells(retriever, folder):
    e = retriever.embed(folder, fields=("embedding",))
    with pytest.raises(ConfigError, match="re-ranking needs the local embeddings"):
        retriever.rerank(e, k=3)


def test_embed_cli_writes_what_embed_returns(make_checkpoint, folder, tmp_path):
    ckpt = make_checkpoint()
    out = tmp_path / "out" / "emb.npz"
    assert main(["embed", "--checkpoint", str(ckpt), "--data", str(folder), "-o", str(out), "--device", "cpu"]) == 0
    saved = Embeddings.load_npz(out)
    expected = Retriever.from_checkpoint(ckpt, "cpu").embed(folder)
    assert saved.fields == ("embedding", "local")
    torch.testing.assert_close(saved.embedding, expected.embedding)
    torch.testing.assert_close(saved.local, expected.local)
    assert saved.labels.tolist() == expected.labels.tolist() and saved.positions.tolist() == expected.positions.tolist()
    assert saved.paths == expected.paths


@pytest.mark.parametrize("how", ["data", "same-folder"])
def test_eval_scores_a_folder_against_itself_leaving_each_query_out(make_checkpoint, folder, tmp_path, how):
    ckpt = make_checkpoint()
    out = tmp_path / "m.json"
    where = ["--data", str(folder)] if how == "data" else ["--query", str(folder), "--gallery", str(folder) + "/."]
    assert main(["eval", "--checkpoint", str(ckpt), "--device", "cpu", *where, "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    e = Retriever.from_checkpoint(ckpt, "cpu").embed(folder)
    # brute force: each query's nearest other image
    scores = e.embedding @ e.embedding.T
    scores.fill_diagonal_(-float("inf"))
    r1 = float((e.labels[scores.argmax(1)] == e.labels).double().mean())
    assert metrics["recall@1"] == pytest.approx(r1)
    assert metrics == pytest.approx(retrieval_metrics(e.embedding, e.labels, recall_ks=(1, 2, 4, 8)))


def test_rerank_is_refused_for_groups_without_a_spatial_head(make_checkpoint, capsys):
    ckpt = make_checkpoint("model.groups=2")
    r = Retriever.from_checkpoint(ckpt, "cpu")
    assert "local" not in r.fields and "attention" in r.fields
    assert main(["eval", "--checkpoint", str(ckpt), "--device", "cpu", "--rerank", "structural"]) == 2
    assert "spatial_head=own" in capsys.readouterr().err
