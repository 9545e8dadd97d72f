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
    """Every src / href, and each query row's query index with its result cards (class, text)."""

    def __init__(self):
        super().__init__()
        self.links, self.rows, self._card = [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [a[k] for k in ("src", "href") if k in a]
        if tag == "div" and a.get("class") == "query":
            self.rows.append({"query": None, "cards": []})
        if tag == "button" and "result" in (a.get("class") or ""):
            self._card = {"class": a["class"], "text": ""}
            self.rows[-1]["cards"].append(self._card)

    def handle_endtag(self, tag):
        if tag == "button":
            self._card = None

    def handle_data(self, data):
        if self._card is not None:
            self._card["text"] += data + " "
        elif self.rows and self.rows[-1]["query"] is None and (m := re.fullmatch(r"query (\d+)", data.strip())):
            self.rows[-1]["query"] = int(m.group(1))


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
    assert len(parser.rows) == 3 and all(len(r["cards"]) == 3 for r in parser.rows)
    for row in parser.rows:
        qi = row["query"]
        top = torch.argsort(sim[qi], descending=True, stable=True)[:3]
        for card, gi in zip(row["cards"], top.tolist(), strict=True):
            assert ("hit" in card["class"].split()) == bool(labels[gi] == labels[qi])
            shown = float(re.search(r"global cos (-?[\d.]+)", card["text"]).group(1))
            assert shown == pytest.approx(float(sim[qi, gi]), abs=1.5e-3)
    metrics = evaluate_model(model, test, device="cpu")
    page = (report / "index.html").read_text()
    assert f"<td>{100 * metrics['recall@1']:.2f}</td>" in page and f"<td>{100 * metrics['map_at_r']:.2f}</td>" in page
    assert page.count("<td>K=") == 3  # the sweep at K = 0, 2 and 100 (capped at the gallery)


def test_every_result_has_its_explanation(report):
    page = (report / "index.html").read_text()
    pairs = re.findall(r'data-pair="([^"]+)"', page)
    assert len(pairs) == 9
    for pair in pairs:
        block = page.split(f'<div id="{pair}" hidden>')[1].split("</div>")[0]
        assert "global" in block and "structural" in block and "_flows.png" in block


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
    assert "structural" in page.text_content("dialog[open] pre")
    assert all(u.startswith("file://") for u in requested)
    page.click("#explain-close")
    assert not page.evaluate("document.getElementById('explain').open")


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
    """(query position, gallery position) of every explained pair on the page."""
    found = re.findall(r"<h3>query (\d+) \(.*?\) and result #\d+: gallery image (\d+) ", page)
    return [(int(q), int(g)) for q, g in found]


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
