"""The explorer's JSON API through FastAPI's test client, against brute-force references."""

import io
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from serve_runs import fit_idml, write_gallery

from glassmetric.checkpoints import load_trained
from glassmetric.data.folder import ImageFolderDataset
from glassmetric.factory import eval_transform
from glassmetric.retrieval.embed import embed_fields
from glassmetric.serve.app import create_app
from glassmetric.serve.explorer import Explorer
from glassmetric.serve.limits import Limits


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``(root, checkpoint, gallery image paths)``: a tiny IDML run and a gallery folder."""
    root = tmp_path_factory.mktemp("serve")
    return root, fit_idml(root / "run"), write_gallery(root / "gallery", 16)


def setup_paths(files) -> tuple[str, Path]:
    root, checkpoint, _ = files
    return str(checkpoint), root / "gallery"


@pytest.fixture(scope="module")
def setup(files):
    root, checkpoint, paths = files
    explorer = Explorer.open(str(checkpoint), root / "gallery", cache_dir=root / "cache", progress=False)
    client = TestClient(
        create_app(explorer, Limits(max_upload_bytes=200_000, max_pixels=400 * 400, max_k=12)),
        base_url="http://127.0.0.1",
    )
    model, cfg = load_trained(str(checkpoint))
    ref = embed_fields(
        model,
        ImageFolderDataset(root / "gallery", transform=eval_transform(cfg, model)),
        fields=("embedding", "uncertainty"),
    )
    return client, paths, ref


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_info_gallery_and_schema(setup):
    client, paths, _ = setup
    info = client.get("/api/info").json()
    assert info["gallery_size"] == 16 and info["labelled"] and info["fields"] == ["embedding", "local", "uncertainty"]
    page = client.get("/api/gallery", params={"offset": 10, "limit": 4}).json()
    assert page["total"] == 16 and [i["id"] for i in page["items"]] == ["g10", "g11", "g12", "g13"]
    assert page["items"][0]["name"] == paths[10].relative_to(paths[10].parents[1]).as_posix()
    paths_in_schema = set(client.get("/openapi.json").json()["paths"])
    assert {"/api/search", "/api/explain", "/api/uncertainty", "/api/info"} <= paths_in_schema
    assert client.get("/").headers["content-type"].startswith("text/html")


def test_the_api_reference_page_works_offline(setup):
    """/docs lists every operation of the schema with its parameters and loads nothing from
    elsewhere (FastAPI's Swagger UI needs a CDN); /redoc is off."""
    import re
    from html import escape

    client, _, _ = setup
    res = client.get("/docs")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    html = res.text
    assert not re.search(r"<script|<link|src=|https?://", html)
    schema = client.get("/openapi.json").json()
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            assert f"{method.upper()}</span> {path}</h2>" in html
            assert escape(op["summary"]) in html
            for p in op.get("parameters", []):
                assert f"<code>{p['name']}</code>" in html
    assert "<code>image</code>: file, <code>k</code>: integer (optional, default <code>10</code>)" in html
    assert client.get("/redoc").status_code == 404


def test_search_with_a_gallery_image_matches_brute_force(setup):
    client, _, ref = setup
    res = client.get("/api/search", params={"query": "g3", "k": 5}).json()
    sims = ref["embedding"] @ ref["embedding"][3]
    sims[3] = -float("inf")  # the query is not its own result
    expected = torch.argsort(sims, descending=True, stable=True)[:5].tolist()
    assert [r["id"] for r in res["results"]] == [f"g{i}" for i in expected]
    for r, i in zip(res["results"], expected, strict=True):
        assert r["scores"]["global"] == pytest.approx(float(sims[i]), abs=1e-5)
        assert r["correct"] == bool(ref["labels"][i] == ref["labels"][3])
        assert r["scores"]["multiscale"] == pytest.approx(r["scores"]["global"] + r["scores"]["structural"], abs=1e-5)
        assert r["scores"]["uncertainty"] == pytest.approx(float(ref["uncertainty"][i].norm()), rel=1e-4)
    assert res["uncertainty"] == pytest.approx(float(ref["uncertainty"][3].norm()), rel=1e-4)


@pytest.fixture(scope="module")
def reranked(files):
    """Retriever.rerank of the gallery folder against itself, each image's global top-12
    re-ranked (what `glassmetric eval --data <gallery> --rerank structural --k 12` ranks)."""
    from glassmetric.retriever import Retriever

    root, checkpoint, _ = files
    retriever = Retriever.from_checkpoint(str(checkpoint), "cpu")
    return retriever, retriever.embed(root / "gallery"), retriever.rerank(root / "gallery", k=12)


def test_structural_re_ranking_is_retriever_rerank_with_moves(setup, reranked):
    client, _, ref = setup
    _, _, expected = reranked
    res = client.get("/api/search", params={"query": "g3", "k": 5, "rerank": "structural", "rerank_k": 12}).json()
    assert res["ranking"] == {"method": "structural", "k": 12, "ordered_by": "multiscale"}
    rows = [int(r["id"][1:]) for r in res["results"]]
    assert rows == expected.indices[3, :5].tolist()
    sims = ref["embedding"] @ ref["embedding"][3]
    sims[3] = -float("inf")
    global_rank = {g: r + 1 for r, g in enumerate(torch.argsort(sims, descending=True, stable=True).tolist())}
    for r, (row, result) in enumerate(zip(rows, res["results"], strict=True)):
        assert result["score"] == result["scores"]["multiscale"]
        assert result["score"] == pytest.approx(float(expected.scores[3, r]), abs=1e-5)
        assert result["global_rank"] == global_rank[row] and result["move"] == global_rank[row] - (r + 1)
    assert [r["score"] for r in res["results"]] == sorted((r["score"] for r in res["results"]), reverse=True)

    plain = client.get("/api/search", params={"query": "g3", "k": 5}).json()
    assert plain["ranking"] == {"method": "global", "k": 0, "ordered_by": "global"}
    assert [r["score"] for r in plain["results"]] == [r["scores"]["global"] for r in plain["results"]]
    assert all(r["move"] == 0 for r in plain["results"])
    same_k = client.get("/api/search", params={"query": "g3", "k": 5, "rerank": "structural"}).json()
    assert same_k["ranking"]["k"] == 5  # rerank_k defaults to k: the shown results re-sorted
    assert sorted(r["id"] for r in same_k["results"]) == sorted(r["id"] for r in plain["results"])


def test_an_upload_re_ranks_against_the_whole_gallery_and_finds_itself(setup, reranked):
    client, paths, _ = setup
    retriever, gallery, _ = reranked
    form = {"k": "4", "rerank": "structural", "rerank_k": "10"}
    res = client.post("/api/search", files={"image": ("mine.png", paths[7].read_bytes(), "image/png")}, data=form)
    assert res.status_code == 200, res.text
    expected = retriever.rerank(paths[7], gallery, k=10)
    assert [r["id"] for r in res.json()["results"]] == [f"g{i}" for i in expected.indices[0, :4].tolist()]
    assert [r["same_image"] for r in res.json()["results"]] == [True, False, False, False]  # g7 is the upload


def test_bad_ranking_values_are_named(setup):
    client, _, _ = setup
    for params, words in (
        ({"rerank": "cosine"}, "rerank: expected one of global, structural, got 'cosine'"),
        ({"rerank": "structural", "k": 5, "rerank_k": 3}, "rerank_k: expected rerank_k >= k (5), got 3"),
        ({"rerank": "structural", "rerank_k": 13}, "rerank_k: expected 1 <= rerank_k <= 12, got 13"),
    ):
        res = client.get("/api/search", params={"query": "g1", **params})
        assert res.status_code == 422 and res.json()["detail"] == words


def test_upload_search_explain_and_uncertainty(setup):
    client, paths, ref = setup
    data = paths[7].read_bytes()
    res = client.post("/api/search", files={"image": ("mine.png", data, "image/png")}, data={"k": "3"})
    assert res.status_code == 200, res.text
    body = res.json()
    top = body["results"][0]
    assert top["id"] == "g7" and top["scores"]["global"] == pytest.approx(1.0, abs=1e-4)  # the same image
    assert top["correct"] is None  # an upload has no class
    qid = body["query"]
    e = client.get("/api/explain", params={"query": qid, "result": "g2"}).json()
    assert any(line.startswith("global") for line in e["lines"]) and set(e["figures"]) == {"flows"}
    fig = client.get(e["figures"]["flows"])
    assert fig.headers["content-type"] == "image/png" and Image.open(io.BytesIO(fig.content)).size[0] > 500
    assert client.get(f"/api/images/{qid}").content[:8] == b"\x89PNG\r\n\x1a\n"
    u = client.post("/api/uncertainty", files={"image": ("x.png", data, "image/png")}).json()["uncertainty"]
    assert u == pytest.approx(float(ref["uncertainty"][7].norm()), rel=1e-4)
    assert client.get("/api/uncertainty", params={"query": qid}).json()["uncertainty"] == pytest.approx(u)


@pytest.mark.parametrize(
    "name, data, status, words",
    [
        ("big.png", b"\x89PNG" + b"0" * 250_000, 413, "over the limit"),
        ("wide.png", _png(Image.new("RGB", (500, 400))), 413, "pixels"),
        ("notes.txt", b"just some text", 415, "not an image"),
    ],
)
def test_refused_uploads_get_4xx_and_the_server_keeps_serving(setup, name, data, status, words):
    client, _, _ = setup
    res = client.post("/api/search", files={"image": (name, data, "application/octet-stream")})
    assert res.status_code == status and words in res.json()["detail"]
    assert client.get("/api/search", params={"query": "g0", "k": 2}).status_code == 200


def test_bad_ids_and_values_are_named(setup):
    client, _, _ = setup
    for params, status, words in (
        ({"query": "g99"}, 404, "g99"),
        ({"query": "u0000"}, 404, "u0000"),
        ({"query": "g1", "k": 13}, 422, "k"),
        ({"query": "nonsense"}, 404, "nonsense"),
    ):
        res = client.get("/api/search", params=params)
        assert res.status_code == status and words in res.json()["detail"]
    res = client.get("/api/explain/figure", params={"query": "g1", "result": "g2", "kind": "groups"})
    assert res.status_code == 404 and "groups" in res.json()["detail"]


def test_serve_command_checks_its_settings_first(tmp_path, capsys):
    from glassmetric.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "none.ckpt"), "--max-in-flight", "0"]) == 2
    assert "--max-in-flight" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path / "none.ckpt"), "--port", "0"]) == 2
    assert "none.ckpt" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_explorer_on_a_faiss_index_matches_brute_force(setup, files, reranked, tmp_path, kind):
    """`serve --knn index`: the explorer searches a faiss gallery index (saved to and read back
    from --index-dir) and returns the brute-force top k, and the re-ranking of its shortlist."""
    _, _, ref = setup
    checkpoint, gallery = setup_paths(files)
    opened = []
    for _ in range(2):  # built and saved, then read back from the folder
        explorer = Explorer.open(
            checkpoint,
            gallery,
            cache_dir=gallery.parent / "cache",
            progress=False,
            index_dir=tmp_path / "index",
            overrides=[f"eval.index.kind={kind}"],
        )
        opened.append(explorer)
        client = TestClient(create_app(explorer, Limits(max_k=12)), base_url="http://127.0.0.1")
        res = client.get("/api/search", params={"query": "g3", "k": 5}).json()
        sims = ref["embedding"] @ ref["embedding"][3]
        sims[3] = -float("inf")
        expected = torch.argsort(sims, descending=True, stable=True)[:5].tolist()
        assert [r["id"] for r in res["results"]] == [f"g{i}" for i in expected]
        structural = client.get("/api/search", params={"query": "g3", "k": 5, "rerank": "structural", "rerank_k": 12})
        assert [r["id"] for r in structural.json()["results"]] == [f"g{i}" for i in reranked[2].indices[3, :5].tolist()]
    assert (tmp_path / "index" / "index.json").is_file()
    assert f"kind='{kind}'" in repr(opened[1].search_index)


def test_top_k_drops_the_missing_hits_of_an_approximate_index():
    from glassmetric.serve.search import top_k

    class Sparse:  # found 2 of the 4 asked for, as a small HNSW / IVF search may
        size = 10

        def search(self, query, k):
            return torch.tensor([[0.9, 0.8, -float("inf"), -float("inf")]])[:, :k], torch.tensor([[4, 7, -1, -1]])[
                :, :k
            ]

    scores, idx = top_k(Sparse(), torch.zeros(3), 3, exclude=7)
    assert idx.tolist() == [4] and scores.tolist() == [pytest.approx(0.9)]


def test_serve_refuses_an_unknown_search(files):
    checkpoint, gallery = setup_paths(files)
    from glassmetric.errors import ConfigError

    with pytest.raises(ConfigError, match="knn"):
        Explorer.open(checkpoint, gallery, cache_dir=gallery.parent / "cache", progress=False, knn="faiss")


@pytest.mark.parametrize("gid", ["g²", "g⁹", "g1²", "g" + "1" * 4301, "g-1", "g 1", "g1\n"])
def test_ids_outside_ascii_digits_are_unknown_everywhere(setup, gid):
    """Every endpoint that takes an id answers 404 naming it for ids that str.isdigit accepts
    but int() does not read (superscripts, more digits than int() converts), and for others
    that are not g<ASCII digits>."""
    client, _, _ = setup
    for res in (
        client.get(f"/api/images/{quote(gid)}"),
        client.get("/api/search", params={"query": gid}),
        client.get("/api/explain", params={"query": gid, "result": "g1"}),
        client.get("/api/explain", params={"query": "g1", "result": gid}),
        client.get("/api/uncertainty", params={"query": gid}),
    ):
        assert res.status_code == 404, (res.request.url, res.text)
        assert "unknown gallery image" in res.json()["detail"] and len(res.json()["detail"]) < 200


def test_a_chunked_upload_over_the_limit_gets_413(setup):
    """An upload without Content-Length (chunked) is cut off at the body limit with 413, also
    through FastAPI's form parsing; the server keeps serving."""
    client, _, _ = setup

    def chunks():
        for _ in range(16):
            yield b"\x89PNG" + b"0" * 65532

    res = client.post("/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert "content-length" not in res.request.headers
    assert res.status_code == 413 and "over the limit" in res.json()["detail"], res.text
    assert client.get("/api/search", params={"query": "g0", "k": 2}).status_code == 200


def test_foreign_hosts_and_cross_origin_posts_are_refused(setup, files):
    """DNS rebinding: a request whose Host is a foreign name gets 421 and nothing about the
    gallery; a POST whose Origin is another site gets 403 and is not processed. The explorer's
    own page (Origin = its Host) and clients without an Origin are served."""
    client, paths, _ = setup
    gallery = str(setup_paths(files)[1])
    port = "8123"
    for host in ("evil.example.com", f"evil.example.com:{port}", "127.0.0.1.evil.example.com", "localhost.evil", ""):
        res = client.get("/api/info", headers={"host": host})
        assert res.status_code == 421 and gallery not in res.text, (host, res.text)
        res = client.get("/api/gallery", headers={"host": host})
        assert res.status_code == 421 and paths[0].name not in res.text, (host, res.text)
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LocalHost"):
        res = client.get("/api/info", headers={"host": host})
        assert res.status_code == 200 and res.json()["gallery"] == gallery, host
    upload = {"image": ("mine.png", paths[7].read_bytes(), "image/png")}
    foreign = client.post(
        "/api/search",
        files=upload,
        headers={"host": f"evil.example.com:{port}", "origin": f"http://evil.example.com:{port}"},
    )
    assert foreign.status_code == 421 and "results" not in foreign.text
    for origin in (f"http://evil.example.com:{port}", "null", f"http://localhost:{port}", f"https://127.0.0.1:{port}"):
        res = client.post("/api/search", files=upload, headers={"host": f"127.0.0.1:{port}", "origin": origin})
        assert res.status_code == 403 and origin in res.json()["detail"] and "results" not in res.text, origin
    for headers in ({"host": f"127.0.0.1:{port}", "origin": f"http://127.0.0.1:{port}"}, {"host": f"127.0.0.1:{port}"}):
        res = client.post("/api/search", files=upload, headers=headers)
        assert res.status_code == 200 and res.json()["results"][0]["id"] == "g7", headers
