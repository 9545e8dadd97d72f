"""The faiss gallery index against brute-force search; save / load; metrics and re-ranking on it."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glassmetric.config import IndexConfig
from glassmetric.errors import IndexFileError
from glassmetric.retrieval.index import GalleryIndex, IndexRecallWarning, choose_kind
from glassmetric.retrieval.metrics import ranking_metrics, retrieval_metrics
from glassmetric.retrieval.rerank import rerank_sweep, structural_rerank

NON_NMI = ("recall", "r_precision", "map_at_r")


def clustered(n, dim=16, clusters=20, seed=0, spread=0.4):
    """Unit vectors around ``clusters`` random centres (labels = cluster)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, clusters, (n,), generator=g)
    centres = torch.randn(clusters, dim, generator=g)
    return F.normalize(centres[labels] + spread * torch.randn(n, dim, generator=g), dim=-1), labels


def brute_topk(q, g, k, exclude_self=False):
    s = q.double() @ g.double().T
    if exclude_self:
        s.fill_diagonal_(-np.inf)
    return torch.from_numpy(np.argsort(-s.numpy(), axis=1, kind="stable")[:, :k].copy())


def recall_at(found, truth):
    return np.mean([len(set(a.tolist()) & set(b.tolist())) / truth.shape[1] for a, b in zip(found, truth, strict=True)])


def test_kind_is_chosen_by_gallery_size():
    s = IndexConfig(exact_below=100, hnsw_below=1000)
    assert [choose_kind(n, s) for n in (99, 100, 999, 1000)] == ["exact", "hnsw", "hnsw", "ivf"]
    assert choose_kind(10, IndexConfig(kind="ivf")) == "ivf"
    assert GalleryIndex.build(clustered(50)[0]).kind == "exact"  # defaults: exact below 50,000


@pytest.mark.parametrize("exclude_self", [False, True])
def test_exact_index_is_brute_force(exclude_self):
    x, _ = clustered(300)
    index = GalleryIndex.build(x, IndexConfig(kind="exact"))
    scores, ids = index.search(x[:40] if not exclude_self else x, 10, exclude_self=exclude_self)
    q = x[:40] if not exclude_self else x
    assert torch.equal(ids, brute_topk(q, x, 10, exclude_self))
    torch.testing.assert_close(scores, (q @ x.T).gather(1, ids), rtol=0, atol=1e-5)


def test_ivf_probing_every_list_is_exact_and_fewer_lists_is_approximate():
    x, _ = clustered(2000)
    q = clustered(100, seed=1)[0]
    truth = brute_topk(q, x, 10)
    full = GalleryIndex.build(x, IndexConfig(kind="ivf", nlist=16, nprobe=16, target_recall=None))
    assert full.params == {"nlist": 16, "nprobe": 16}
    assert torch.equal(full.search(q, 10)[1], truth)
    one = GalleryIndex.build(x, IndexConfig(kind="ivf", nlist=16, nprobe=1, target_recall=None))
    assert 0.2 < recall_at(one.search(q, 10)[1], truth) < 1.0


def test_hnsw_recall_against_brute_force():
    x, _ = clustered(2000)
    q = clustered(100, seed=1)[0]
    index = GalleryIndex.build(x, IndexConfig(kind="hnsw", hnsw_m=16, ef_search=256))
    assert recall_at(index.search(q, 10)[1], brute_topk(q, x, 10)) >= 0.99


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
def test_save_and_load_give_the_same_search(tmp_path, kind):
    x, _ = clustered(1000)
    index = GalleryIndex.build(x, IndexConfig(kind=kind, nlist=8, nprobe=2, ef_search=20, target_recall=None))
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert manifest["kind"] == kind and manifest["size"] == 1000 and manifest["dim"] == 16
    loaded = GalleryIndex.load(tmp_path / "idx")
    assert loaded.kind == kind and loaded.params == index.params
    for a, b in zip(index.search(x[:30], 5), loaded.search(x[:30], 5), strict=True):
        assert torch.equal(a, b)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(IndexFileError, match=r"index\.json"):
        GalleryIndex.load(tmp_path / "nothing")
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "index.json").write_text("{not json")
    with pytest.raises(IndexFileError, match="not valid JSON"):
        GalleryIndex.load(folder)
    x, _ = clustered(100)
    GalleryIndex.build(x).save(folder)
    manifest = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps({**manifest, "size": 99}))
    with pytest.raises(IndexFileError, match=r"index\.faiss holds 100 vectors"):
        GalleryIndex.load(folder)
    with pytest.raises(IndexFileError, match="100 vectors of dim 16"):
        GalleryIndex.build(x).check_fits(x[:50])


def test_metrics_with_an_exact_enough_index_equal_exact_search():
    x, labels = clustered(600, spread=0.8)
    index = GalleryIndex.build(x, IndexConfig(kind="ivf", nlist=8, nprobe=8))
    exact = retrieval_metrics(x, labels, include=NON_NMI)
    assert retrieval_metrics(x, labels, include=NON_NMI, knn_backend="index", knn_index=index) == exact
    assert retrieval_metrics(x, labels, include=NON_NMI, knn_backend="index") == exact  # default: exact at this size


def test_empty_slots_of_an_approximate_index_count_as_misses():
    labels = torch.tensor([0, 0, 1, 1])
    ranking = torch.tensor([[1, 2, -1], [2, -1, -1], [3, 0, -1], [0, 1, 2]])
    # the same ranking with each empty slot holding a wrong-class item instead
    filled = torch.tensor([[1, 2, 3], [2, 3, 3], [3, 0, 1], [0, 1, 2]])
    kw = {"recall_ks": (1, 2, 3), "exclude_self": True}
    assert ranking_metrics(ranking, labels, labels, **kw) == ranking_metrics(filled, labels, labels, **kw)


def _local(glob, seed=0, cells=4):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(glob[:, None, :] + 0.8 * torch.randn(len(glob), cells, glob.shape[1], generator=g), dim=-1)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_rerank_on_an_exact_enough_index_equals_the_exact_shortlist(kind):
    x, labels = clustered(150, clusters=10, spread=0.8)
    local = _local(x)
    settings = IndexConfig(kind=kind, nlist=3, nprobe=3, hnsw_m=32, ef_construction=200, ef_search=400)
    index = GalleryIndex.build(x, settings)
    ot = {"epsilon": 0.05, "iters": 30}
    exact = structural_rerank(x, local, k=10, n_neighbours=20, **ot)
    approx = structural_rerank(x, local, k=10, n_neighbours=20, index=index, **ot)
    assert torch.equal(approx.indices, exact.indices)
    torch.testing.assert_close(approx.scores, exact.scores, equal_nan=True)
    sweep = dict(query_labels=labels, ks=(0, 10), **ot)
    assert rerank_sweep(x, local, index=index, **sweep) == rerank_sweep(x, local, **sweep)


def test_rerank_refuses_a_shortlist_with_empty_slots():
    x, _ = clustered(400, spread=0.8)
    index = GalleryIndex.build(x, IndexConfig(kind="ivf", nlist=10, nprobe=1, target_recall=None))
    with pytest.raises(ValueError, match="fewer than 390 neighbours"):
        structural_rerank(x[:2], _local(x[:2]), x, _local(x), k=390, index=index, iters=5)


def test_eval_cli_builds_then_reuses_the_index_cache(tmp_path, make_checkpoint, capsys):
    from glassmetric.cli import main

    ckpt = make_checkpoint("data.image_size=64", "data.resize=64")
    cache, outs = tmp_path / "index", [tmp_path / "a.json", tmp_path / "b.json"]
    common = ["eval", "--checkpoint", str(ckpt), "--device", "cpu", "--index-dir", str(cache), "eval.index.kind=hnsw"]
    assert main([*common, "--out", str(outs[0])]) == 0
    assert json.loads((cache / "index.json").read_text())["kind"] == "hnsw"
    stamp = (cache / "index.faiss").stat().st_mtime_ns
    assert main([*common, "--out", str(outs[1])]) == 0
    assert (cache / "index.faiss").stat().st_mtime_ns == stamp  # read, not rebuilt
    exact = tmp_path / "exact.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--device", "cpu", "--out", str(exact)]) == 0
    a, b, e = (json.loads(p.read_text())["metrics"] for p in (*outs, exact))
    assert a == b and a == pytest.approx(e)  # 16 test images: HNSW finds them all


def _other_weights(path, name="other.ckpt"):
    """A copy of checkpoint ``path`` whose embedding head has other (random) weights: the same
    data and embedding size, other embeddings."""
    ckpt = torch.load(path, weights_only=True)
    weight = ckpt["state_dict"]["model.head.linear.weight"]
    ckpt["state_dict"]["model.head.linear.weight"] = (
        torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)) * weight.std()
    )
    out = path.parent / name
    torch.save(ckpt, out)
    return out


def _eval(ckpt, out, *args):
    from glassmetric.cli import main

    assert main(["eval", "--checkpoint", str(ckpt), "--device", "cpu", "--out", str(out), *args]) == 0
    return json.loads(out.read_text())["metrics"]


def test_eval_rebuilds_an_index_built_from_another_checkpoints_embeddings(tmp_path, make_checkpoint, caplog):
    """`eval --index-dir` with checkpoint A, then with checkpoint B (same data, same embedding
    size): B's metrics are those of exact search on B's embeddings, from a rebuilt index."""
    from glassmetric.checkpoints import load_trained
    from glassmetric.factory import make_splits
    from glassmetric.retrieval.embed import embed_dataset
    from glassmetric.retrieval.index import fingerprint

    a = make_checkpoint("data.image_size=64", "data.resize=64")
    b = _other_weights(a)
    cache = tmp_path / "index"
    _eval(a, tmp_path / "a.json", "--index-dir", str(cache))
    with caplog.at_level("WARNING", logger="glassmetric.retrieval"):
        from_cache = _eval(b, tmp_path / "b.json", "--index-dir", str(cache))
    assert f"the gallery index in {cache} was built from other embeddings" in caplog.text
    model, cfg = load_trained(str(b))
    emb, labels = embed_dataset(model, make_splits(cfg, model).test)
    manifest = json.loads((cache / "index.json").read_text())
    assert manifest["fingerprint"] == fingerprint(emb)
    # an independent brute-force R@1 of B's embeddings
    sims = emb.double() @ emb.double().T
    sims.fill_diagonal_(-np.inf)
    assert from_cache["recall@1"] == pytest.approx(float((labels[sims.argmax(1)] == labels).double().mean()))
    assert from_cache == pytest.approx(_eval(b, tmp_path / "exact.json"))
    stamp = (cache / "index.faiss").stat().st_mtime_ns
    assert _eval(b, tmp_path / "again.json", "--index-dir", str(cache)) == from_cache
    assert (cache / "index.faiss").stat().st_mtime_ns == stamp  # the same embeddings: read, not rebuilt


def test_a_cached_index_is_rebuilt_for_another_size_or_settings_and_refused_when_unwritable(tmp_path, caplog):
    from glassmetric.retrieval.evaluate import cached_gallery_index
    from glassmetric.retrieval.index import fingerprint

    x, _ = clustered(300)
    folder = tmp_path / "index"
    cached_gallery_index(x, IndexConfig(kind="exact"), folder)
    with caplog.at_level("WARNING", logger="glassmetric.retrieval"):
        index = cached_gallery_index(x[:200], IndexConfig(kind="exact"), folder)
        assert "holds 300 vectors of dim 16, the gallery is (200, 16): building it again" in caplog.text
        assert len(index) == 200 and json.loads((folder / "index.json").read_text())["fingerprint"] == fingerprint(
            x[:200]
        )
        caplog.clear()
        index = cached_gallery_index(x[:200], IndexConfig(kind="hnsw", hnsw_m=8), folder)
        assert "is exact, eval.index asks for hnsw (hnsw_m 8, ef_construction 80)" in caplog.text
        assert GalleryIndex.load(folder).kind == "hnsw"
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(IndexFileError, match=r"cannot write the gallery index to .*file"):
        cached_gallery_index(x, IndexConfig(kind="exact"), tmp_path / "file")


def test_serve_rebuilds_an_index_built_from_another_checkpoints_embeddings(tmp_path, make_checkpoint):
    """`serve --index-dir` follows the same rule: with checkpoint B after A, the explorer's
    results are the brute-force neighbours of B's embeddings."""
    from glassmetric.serve.explorer import Explorer

    a = make_checkpoint("data.image_size=64", "data.resize=64")
    b = _other_weights(a)
    kw = {"cache_dir": tmp_path / "cache", "progress": False, "index_dir": tmp_path / "index"}
    Explorer.open(str(a), None, **kw)
    explorer = Explorer.open(str(b), None, **kw)
    emb = explorer.gallery.fields["embedding"]
    sims = emb.double() @ emb.double().T
    sims.fill_diagonal_(-np.inf)
    for i in range(len(emb)):
        _, ids = explorer.search_index.search(emb[i : i + 1], 2)
        assert int(ids[0, 0]) == i and int(ids[0, 1]) == int(sims[i].argmax())


def _mixture(n, dim, noise, per_cluster=100, seed=0):
    """bench/index.py's data: unit vectors around n / per_cluster random unit centres, noise of
    norm ``noise``; returns a gallery of ``n`` and 300 fresh queries."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // per_cluster, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(m):
        x = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, dim)).astype(
            np.float32
        ) * noise / np.sqrt(dim)
        return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))

    return draw(n), draw(300)


def test_the_default_ivf_search_holds_its_target_recall_on_overlapping_clusters():
    """Overlapping clusters spread each query's true top 10 over many IVF lists: a fixed nprobe
    of 32 finds about two thirds of them; the default search is tuned to recall@10 >= 0.95."""
    x, q = _mixture(20_000, 64, noise=2.0)
    truth = brute_topk(q, x, 10)
    fixed = GalleryIndex.build(x, IndexConfig(kind="ivf", target_recall=None))
    assert fixed.params == {"nlist": 512, "nprobe": 32}
    assert recall_at(fixed.search(q, 10)[1], truth) < 0.8
    with pytest.warns(IndexRecallWarning, match=r"only by probing 256 of its 512 lists \(50% of the gallery"):
        tuned = GalleryIndex.build(x, IndexConfig(kind="ivf"))
    assert tuned.params["nprobe"] > 32 and tuned.params["recall@10"] >= 0.95
    assert recall_at(tuned.search(q, 10)[1], truth) >= 0.95
    assert abs(tuned.params["recall@10"] - recall_at(tuned.search(q, 10)[1], truth)) < 0.03  # the estimate is honest


def test_the_tuning_is_saved_and_an_unreachable_target_warns(tmp_path, monkeypatch):
    from glassmetric.retrieval import index as index_module

    x, _ = _mixture(4000, 32, noise=2.0, per_cluster=20)
    settings = IndexConfig(kind="ivf", nlist=64, nprobe=2)
    tuned = GalleryIndex.build(x, settings)
    tuned.save(tmp_path / "ivf")
    loaded = GalleryIndex.load(tmp_path / "ivf", settings)
    assert loaded.params == tuned.params and loaded.faiss_index.nprobe == tuned.params["nprobe"] > 2
    assert GalleryIndex.load(tmp_path / "ivf", IndexConfig(nprobe=4, target_recall=None)).params["nprobe"] == 4
    monkeypatch.setattr(index_module, "EF_SEARCH_MAX", 8)
    with pytest.warns(index_module.IndexRecallWarning, match="estimated recall@10 of 0.[0-9]+ at ef_search 8, below"):
        hnsw = GalleryIndex.build(
            x, IndexConfig(kind="hnsw", hnsw_m=4, ef_construction=8, ef_search=2, target_recall=1.0)
        )
    assert hnsw.params["ef_search"] == 8 and hnsw.params["recall@10"] < 1.0
