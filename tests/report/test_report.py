"""`glassmetric report` on a tiny checkpoint: a page that opens offline, whose numbers and
correct / wrong marks agree with an independent brute-force retrieval."""

import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "explain"))
from tiny_runs import fit_tiny  # noqa: E402

from glassmetric.cli import main  # noqa: E402
from glassmetric.retrieval.embed import embed_dataset  # noqa: E402
from glassmetric.retrieval.evaluate import evaluate_model  # noqa: E402
from glassmetric.training.fit import make_splits  # noqa: E402
from glassmetric.training.module import load_trained  # noqa: E402


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
    args = ["report", "--checkpoint", str(checkpoint), "-o", str(out), "--queries", "1", "--top", "3",
            "--k", "0,2,100", "--device", "cpu"]
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
        for card, gi in zip(row["cards"], top.tolist()):
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
    assert main(["report", "--checkpoint", str(ckpt), "-o", str(out), "--queries", "1", "--top", "1", "--device", "cpu"]) == 0
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
    page.route("**/*", lambda route: (requested.append(route.request.url), route.continue_()
                                      if route.request.url.startswith("file://") else route.abort()))
    page.goto((report / "index.html").as_uri())
    page.wait_for_function("[...document.images].filter(i => !i.loading || i.loading != 'lazy').every(i => i.complete)")
    assert page.evaluate("[...document.querySelectorAll('button.result img')].every(i => i.naturalWidth > 0)")
    page.locator("button.result").nth(4).click()
    page.wait_for_selector("dialog[open] img")
    page.wait_for_function("[...document.querySelectorAll('dialog[open] img')].every(i => i.complete && i.naturalWidth > 500)")
    assert "structural" in page.text_content("dialog[open] pre")
    assert all(u.startswith("file://") for u in requested)
    page.click("#explain-close")
    assert not page.evaluate("document.getElementById('explain').open")
