"""`glassmetric report` on a tiny checkpoint: a page that opens offline, whose numbers and
correct / wrong marks agree with an independent brute-force retrieval."""

import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "explain"))
from tiny_runs import fit_tiny

from glassmetric.checkpoints import load_trained
from glassmetric.cli import main
from glassmetric.factory import make_splits
from glassmetric.retrieval.embed import embed_dataset
from glassmetric.retrieval.evaluate import evaluate_model


class _Page(HTMLParser):
    """Every src / href, and each query row: its query position and, per ranking ("global",
    "multiscale"), its result cards (class, text, pair id, the ordering score shown)."""

    def __init__(self):
        super().__init__()
        self.links, self.rows, self._card, self._ranking = [], [], None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [a[k] for k in ("src", "href") if k in a]
        if tag == "div" and a.get("class") == "query":
            self.rows.append({"query": int(a["data-query"]), "rankings": {}})
        if tag == "div" and a.get("class") == "ranking":
            self._ranking = self.rows[-1]["rankings"].setdefault(a["data-ordered-by"], [])
        if tag == "button" and "result" in (a.get("class") or ""):
            self._card = {"class": a["class"], "text": "", "pair": a["data-pair"]}
            self._ranking.append(self._card)
        if tag == "span" and a.get("class") == "score" and self._card is not None:
            self._card["score"] = float(a["data-value"])

    def handle_endtag(self, tag):
        if tag == "button":
            self._card = None

    def handle_data(self, data):
        if self._card is not None:
            self._card["text"] += data + " "


def _pair(card) -> tuple[int, int]:
    """(query position, gallery position) of a card's pair."""
    q, g = card["pair"].rsplit("-", 2)[1:]
    return int(q), int(g)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fit_tiny(tmp_path_factory.mktemp("run"), "model.embedding_dim=16")


@pytest.fixture(scope="module")
def report(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    args = [
        "report",
        "--checkpoint",
        str(checkpoint),
        "-o",
        str(out),
        "--queries",
        "1",
        "--top",
        "3",
        "--k",
        "0,2,100",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    return out


def test_the_page_is_self_contained(report):
    page = (report / "index.html").read_text()
    parser = _Page()
    parser.feed(page)
    assert parser.links, "the page shows images"
    for link in parser.links:
        assert not re.match(r"^(https?:)?//", link), f"{link} needs the network"
        assert (report / link).is_file(), f"{link} is missing"
    assert "<script src" not in page and "<link" not in page  # CSS and JavaScript inline
    assert (report / "sweep.png").stat().st_size > 5000


def test_marks_and_scores_match_a_brute_force_retrieval(report, checkpoint):
    model, cfg = load_trained(str(checkpoint))
    test = make_splits(cfg, model).test
    emb, labels = embed_dataset(model, test)
    sim = emb @ emb.T
    sim.fill_diagonal_(-float("inf"))
    parser = _Page()
    parser.feed((report / "index.html").read_text())
    assert len(parser.rows) == 3 and all(len(r["rankings"]["global"]) == 3 for r in parser.rows)
    for row in parser.rows:
        qi = row["query"]
        top = torch.argsort(sim[qi], descending=True, stable=True)[:3]
        for card, gi in zip(row["rankings"]["global"], top.tolist(), strict=True):
            assert _pair(card) == (qi, gi)
            assert ("hit" in card["class"].split()) == bool(labels[gi] == labels[qi])
            shown = float(re.search(r"cos (-?[\d.]+)", card["text"]).group(1))
            assert shown == pytest.approx(float(sim[qi, gi]), abs=1.5e-3)
    metrics = evaluate_model(model, test, device="cpu")
    page = (report / "index.html").read_text()
    assert f"<td>{100 * metrics['recall@1']:.2f}</td>" in page and f"<td>{100 * metrics['map_at_r']:.2f}</td>" in page
    assert page.count("<td>K=") == 3  # the sweep at K = 0, 2 and 100 (capped at the gallery)


def test_the_re_ranked_column_is_eval_rerank_with_moves_against_brute_force(report, checkpoint):
    """Beside the global top-3, each query's top-3 after re-ranking its global top-K (K = 100,
    the largest swept, capped at the 15 other images) is Retriever.rerank's, the computation
    of `glassmetric eval --rerank structural`; each rank move is the brute-force global rank
    minus the re-ranked one; both columns are in the order of the scores they show; the
    verdict says whether re-ranking turned an R@1 miss into a hit."""
    from glassmetric.retriever import Retriever

    model, cfg = load_trained(str(checkpoint))
    test = make_splits(cfg, model).test
    emb, labels = embed_dataset(model, test)
    sim = emb @ emb.T
    sim.fill_diagonal_(-float("inf"))
    reference = Retriever.from_checkpoint(str(checkpoint), "cpu").rerank(test, k=len(test) - 1)
    page = (report / "index.html").read_text()
    parser = _Page()
    parser.feed(page)
    fixed = 0
    for row in parser.rows:
        qi = row["query"]
        reranked = row["rankings"]["multiscale"]
        assert [_pair(c)[1] for c in reranked] == reference.indices[qi, :3].tolist()
        order = torch.argsort(sim[qi], descending=True, stable=True).tolist()
        global_rank = {g: r + 1 for r, g in enumerate(order)}
        for r, card in enumerate(reranked, start=1):
            move = global_rank[_pair(card)[1]] - r
            expected = "=" if move == 0 else f"\u2191{move}" if move > 0 else f"\u2193{-move}"
            assert expected in card["text"]
            assert card["score"] == pytest.approx(float(reference.scores[qi, r - 1]), abs=1e-5)
        for cards in row["rankings"].values():
            shown = [c["score"] for c in cards]
            assert shown == sorted(shown, reverse=True)
        hit_before = bool(labels[order[0]] == labels[qi])
        hit_after = bool(labels[int(reference.indices[qi, 0])] == labels[qi])
        fixed += int(hit_after and not hit_before)
    assert page.count("re-ranking fixes R@1</span>") == fixed


@pytest.fixture(scope="module")
def folder_report(checkpoint, tmp_path_factory):
    """A report on a class-folder gallery whose class names are long single words."""
    from glassmetric.data.synthetic import SyntheticParts

    root = tmp_path_factory.mktemp("folder-report")
    data = SyntheticParts("test", num_classes=8, images_per_class=4, image_size=64)
    for i in range(12):
        sample = data.load(i)
        folder = root / "birds" / f"{sample.label:03d}.A_very_long_class_name_{sample.label}_that_runs_on_and_on"
        folder.mkdir(parents=True, exist_ok=True)
        sample.image.save(folder / f"Bird_photo_{i:04d}.png")
    out = root / "report"
    args = ["report", "--checkpoint", str(checkpoint), "--data", str(root / "birds"), "-o", str(out)]
    assert main([*args, "--queries", "1", "--top", "5", "--k", "0,4", "--device", "cpu"]) == 0
    return out


def test_queries_are_named_by_file_and_class(folder_report):
    page = (folder_report / "index.html").read_text()
    names = re.findall(r'<b class="qname">([^<]+)</b><br>([^<]+)<br>', page)
    assert len(names) == 3
    for name, label in names:
        assert re.fullmatch(r"Bird_photo_\d{4}\.png", name) and "A_very_long_class_name" in label
    assert not re.search(r"query \d", page)


def test_every_result_has_its_explanation(report):
    page = (report / "index.html").read_text()
    pairs = set(re.findall(r'data-pair="([^"]+)"', page))
    assert len(pairs) >= 9  # the global top-3 of 3 queries, and the re-ranked ones not among them
    for pair in pairs:
        block = page.split(f'<div id="{pair}" hidden>')[1].split("</div>")[0]
        assert "global" in block and "structural" in block and "_flows.png" in block
        assert "<pre>" not in block  # the figure states the scores once; the words are its alt text


def test_groups_model_shows_attention_panels_without_structure(tmp_path):
    ckpt = fit_tiny(tmp_path / "run", "model.embedding_dim=12", "model.groups=3")
    out = tmp_path / "report"
    assert (
        main(["report", "--checkpoint", str(ckpt), "-o", str(out), "--queries", "1", "--top", "1", "--device", "cpu"])
        == 0
    )
    page = (out / "index.html").read_text()
    assert "_groups.png" in page and "_flows.png" not in page and "K-sweep" not in page
    assert "per-group cosines" in page


def test_bad_arguments_are_one_line(checkpoint, tmp_path, capsys):
    assert main(["report", "--checkpoint", str(checkpoint), "-o", str(tmp_path), "--top", "99", "--device", "cpu"]) == 2
    assert "--top 99" in capsys.readouterr().err
    assert main(["report", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.browser
def test_the_report_opens_offline_in_chromium(report, chromium_page):
    page = chromium_page
    requested = []
    page.route(
        "**/*",
        lambda route: (
            requested.append(route.request.url),
            route.continue_() if route.request.url.startswith("file://") else route.abort(),
        ),
    )
    page.goto((report / "index.html").as_uri())
    page.wait_for_function("[...document.images].filter(i => !i.loading || i.loading != 'lazy').every(i => i.complete)")
    assert page.evaluate("[...document.querySelectorAll('button.result img')].every(i => i.naturalWidth > 0)")
    page.locator("button.result").nth(4).click()
    page.wait_for_selector("dialog[open] img")
    page.wait_for_function(
        "[...document.querySelectorAll('dialog[open] img')].every(i => i.complete && i.naturalWidth > 500)"
    )
    assert "structural" in page.get_attribute("dialog[open] img", "alt")
    assert page.text_content("dialog[open]").count("score") == 0  # the score is in the figure, once
    viewport = page.viewport_size
    for box in [
        page.locator("dialog[open] img").nth(i).bounding_box() for i in range(page.locator("dialog[open] img").count())
    ]:
        assert box["height"] <= viewport["height"] and box["width"] <= viewport["width"]
    assert all(u.startswith("file://") for u in requested)
    page.click("#explain-close")
    assert not page.evaluate("document.getElementById('explain').open")


#: (ordered-by, the scores each ranking shows, top to bottom) of every ranking on the page
SHOWN_SCORES = """[...document.querySelectorAll('.ranking')].map(r =>
  [r.dataset.orderedBy, [...r.querySelectorAll('.score')].map(s => parseFloat(s.textContent.split(' ').pop()))])"""

#: every result card's box and its class name's box
CARD_BOXES = """[...document.querySelectorAll('button.result')].map(b => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  return {card: box(b), name: box(b.querySelector('.name')), title: b.title,
          clipped: b.querySelector('.name').scrollHeight > b.querySelector('.name').clientHeight};
})"""


def _overlap(a, b) -> bool:
    return a[0] < b[2] - 0.5 and b[0] < a[2] - 0.5 and a[1] < b[3] - 0.5 and b[1] < a[3] - 0.5


@pytest.mark.browser
def test_the_report_shows_both_rankings_in_score_order_without_overlap(folder_report, chromium_page):
    """In Chromium: each ranking's shown scores read best first (cos, then cos + SS), and long
    class names stay inside their own card (no card or name box overlaps another card), the
    full name on hover."""
    page = chromium_page
    page.goto((folder_report / "index.html").as_uri())
    rankings = page.evaluate(SHOWN_SCORES)
    assert sorted({kind for kind, _ in rankings}) == ["global", "multiscale"]
    for _, scores in rankings:
        assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    cards = page.evaluate(CARD_BOXES)
    assert any(c["clipped"] for c in cards)  # the long names are cut, not spilled
    for i, a in enumerate(cards):
        assert a["name"][0] >= a["card"][0] - 0.5 and a["name"][2] <= a["card"][2] + 0.5
        assert "A_very_long_class_name" in a["title"]
        for b in cards[i + 1 :]:
            assert not _overlap(a["card"], b["card"]) and not _overlap(a["name"], b["card"])


def _folder_with_an_unreadable_image(root: Path, classes=("a", "b", "c")) -> Path:
    """Class folders of 4 tiny-data test images each; the first file of the first class is a
    0-byte PNG."""
    from glassmetric.data.synthetic import SyntheticParts

    data = SyntheticParts("test", num_classes=8, images_per_class=4, image_size=80)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(4):
            data.load(4 * c + j).image.save(root / name / f"bird {j}.png")
    (root / classes[0] / "0 unreadable.png").write_bytes(b"")
    return root


def _shown_pairs(page: str) -> list[tuple[int, int]]:
    """(query position, gallery position) of every result of the global rankings on the page."""
    parser = _Page()
    parser.feed(page)
    return [_pair(card) for row in parser.rows for card in row["rankings"]["global"]]


@pytest.mark.parametrize("mode", ["data", "query-gallery"])
def test_a_skipped_unreadable_image_leaves_every_shown_image_its_own(checkpoint, tmp_path, mode):
    """`report` under data.on_bad_image=skip with an unreadable image first in a folder: each
    thumbnail is the image at its data-set position, and each query's results are its
    brute-force nearest readable images (embedded from a copy without the bad file)."""
    import shutil

    from glassmetric.data.folder import ImageFolderDataset
    from glassmetric.data.image_io import open_image
    from glassmetric.explain.pair import model_view
    from glassmetric.factory import eval_transform

    model, cfg = load_trained(str(checkpoint))
    gallery = _folder_with_an_unreadable_image(tmp_path / "gallery")
    query = _folder_with_an_unreadable_image(tmp_path / "query", ("a", "c")) if mode == "query-gallery" else gallery
    out = tmp_path / "report"
    where = ["--data", str(gallery)] if mode == "data" else ["--query", str(query), "--gallery", str(gallery)]
    assert (
        main(
            [
                "report",
                "--checkpoint",
                str(checkpoint),
                *where,
                "-o",
                str(out),
                "--queries",
                "1",
                "--top",
                "2",
                "--k",
                "0",
                "--device",
                "cpu",
                "data.on_bad_image=skip",
            ]
        )
        == 0
    )

    def listing(root):  # data-set position -> file, and the embeddings of the readable files
        paths = ImageFolderDataset(root, ["a", "b", "c"]).paths
        clean = tmp_path / f"clean-{root.name}"
        shutil.copytree(root, clean)
        (clean / "a" / "0 unreadable.png").unlink()
        emb, _ = embed_dataset(model, ImageFolderDataset(clean, ["a", "b", "c"], transform=eval_transform(cfg, model)))
        readable = [p for p in paths if p.stat().st_size]
        return paths, dict(zip(readable, emb, strict=True))

    g_paths, g_emb = listing(gallery)
    q_paths, q_emb = (g_paths, g_emb) if mode == "data" else listing(query)
    page = (out / "index.html").read_text()
    pairs = _shown_pairs(page)
    assert len(pairs) == 3 * 2
    for qp in sorted({q for q, _ in pairs}):
        q_path = q_paths[qp]
        sims = {p: float(q_emb[q_path] @ e) for p, e in g_emb.items() if not (mode == "data" and p == q_path)}
        expected = sorted(sims, key=sims.get, reverse=True)[:2]
        assert [g_paths[g] for q, g in pairs if q == qp] == expected
    side = {"query": q_paths, "gallery": g_paths, "item": g_paths}
    thumbnails = sorted((out / "images").glob("*.png"))
    assert thumbnails
    for thumb in thumbnails:
        kind, position = thumb.stem.rsplit("-", 1)
        reference = model_view(cfg, open_image(side[kind][int(position)]))
        assert np.array_equal(np.asarray(open_image(thumb)), np.asarray(reference)), thumb.name
