"""End to end in headless Chromium: load the explorer, upload a query, see the results, open an
explanation, pick a gallery query, switch to structural re-ranking, get the message for a refused
upload; the shown order is checked against the shown scores and against Retriever.rerank, the
explanation against the viewport, the long class names against their neighbours' boxes."""

from pathlib import Path

import pytest
import torch
from serve_runs import fit_idml, write_gallery
from server_thread import ServerThread

from glassmetric.retriever import Retriever
from glassmetric.serve.app import create_app
from glassmetric.serve.explorer import Explorer

pytestmark = pytest.mark.browser

#: a class folder name too long for a result card: one word, so only clipping keeps it inside
LONG_CLASS = "{:03d}.Black_footed_Albatross_of_the_very_long_class_names"


@pytest.fixture(scope="module")
def served(browser_available, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    checkpoint = fit_idml(root / "run")
    paths = write_gallery(root / "gallery", 16, LONG_CLASS)
    explorer = Explorer.open(str(checkpoint), root / "gallery", cache_dir=root / "cache", progress=False)
    with ServerThread(create_app(explorer)) as url:
        yield url, paths, root, checkpoint, explorer


#: (id, ordering score shown, move shown) of every result card, top to bottom
SHOWN = """[...document.querySelectorAll('button.result')].map(b => [b.dataset.id,
  parseFloat(b.querySelector('.score').textContent.split(' ').pop()),
  (b.querySelector('.move') || {textContent: ''}).textContent])"""

CARD_BOXES = """[...document.querySelectorAll('button.result')].map(b => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const name = b.querySelector('.name');
  return {card: box(b), name: box(name), title: b.title, clipped: name.scrollHeight > name.clientHeight};
})"""


def _overlap(a, b) -> bool:
    return a[0] < b[2] - 0.5 and b[0] < a[2] - 0.5 and a[1] < b[3] - 0.5 and b[1] < a[3] - 0.5


#: the explanation's first figure starts in the upper half of the window
FIGURE_IN_VIEW = """(() => { const r = document.querySelector('#explanation img.figure').getBoundingClientRect();
  return r.top >= 0 && r.top < window.innerHeight / 2 && r.height > 0; })()"""


def test_upload_search_and_explain_in_the_browser(served, chromium_page, tmp_path):
    url, paths, root, _, _ = served
    page = chromium_page
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("#picker img")
    info = page.text_content("#info")
    assert "16 gallery images in" in info and "explains results by" in info and "embedding" not in info

    page.set_input_files("#upload", str(paths[5]))
    page.click("#search-upload")
    page.wait_for_selector("button.result")
    results = page.locator("button.result")
    assert results.count() == 10
    first = results.nth(0).inner_text()
    assert "#1" in first and "cos 1.000" in first and "same image as the query" in first  # itself
    assert "same image" not in results.nth(1).inner_text()

    results.nth(1).click()
    page.wait_for_selector("#explanation img.figure")
    page.wait_for_function(
        "[...document.querySelectorAll('#explanation img.figure')].every(i => i.complete && i.naturalWidth > 500)"
    )
    assert "structural" in page.get_attribute("#explanation img.figure", "alt")
    assert page.locator("#explanation pre").count() == 0  # the figure states the scores, once
    shot = tmp_path / "explorer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000

    page.evaluate("window.scrollTo(0, 0)")
    page.locator("#picker button").nth(2).click()  # a gallery query: results are marked
    page.wait_for_function("document.querySelector('#query').textContent.includes('g2')")
    marked = page.locator("button.result.hit, button.result.miss")
    assert marked.count() == 10

    bad = root / "notes.png"
    bad.write_text("not an image")
    page.set_input_files("#upload", str(bad))
    page.click("#search-upload")
    page.wait_for_function("document.querySelector('#error').textContent.includes('415')")
    assert errors == []


def test_both_rankings_are_in_score_order_and_re_ranking_is_retriever_rerank(served, chromium_page):
    """Global: the results and their cos read best first, as a brute-force search orders them.
    Structural, top 20 (capped at the 15 other images): the order is Retriever.rerank's on the
    same checkpoint and gallery folder (what `glassmetric eval --rerank structural --k 15`
    ranks), the shown cos + SS read best first, each move is the global rank minus the new
    rank. A click brings the explanation into the viewport."""
    url, _, root, checkpoint, explorer = served
    page = chromium_page
    page.goto(url + "/")
    page.wait_for_selector("#picker img")
    query = 3
    page.locator("#picker button").nth(query).click()
    page.wait_for_function(f"document.querySelector('#query').textContent.includes('g{query}')")

    retriever = Retriever.from_checkpoint(str(checkpoint), "cpu")
    gallery = retriever.embed(root / "gallery")
    names = [Path(p).relative_to(root / "gallery").as_posix() for p in gallery.paths]
    assert names == [explorer.gallery.name(i) for i in range(len(names))]  # the same rows
    cos = gallery.embedding @ gallery.embedding[query]
    cos[query] = -float("inf")
    global_order = torch.argsort(cos, descending=True, stable=True).tolist()

    shown = page.evaluate(SHOWN)
    assert [int(i[1:]) for i, _, _ in shown] == global_order[:10]
    assert [s for _, s, _ in shown] == sorted((s for _, s, _ in shown), reverse=True)
    assert page.get_attribute("#results", "data-ordered-by") == "global"

    page.select_option("#rerank-k", "20")
    page.check("input[value=structural]")
    page.wait_for_function("document.querySelector('#results').dataset.orderedBy === 'multiscale'")
    reference = retriever.rerank(gallery, k=len(names) - 1)
    shown = page.evaluate(SHOWN)
    rows = [int(i[1:]) for i, _, _ in shown]
    assert rows == reference.indices[query, :10].tolist()
    scores = [s for _, s, _ in shown]
    assert scores == sorted(scores, reverse=True)
    assert scores == pytest.approx(reference.scores[query, :10].tolist(), abs=1e-3)
    for rank, (row, (_, _, move)) in enumerate(zip(rows, shown, strict=True), start=1):
        delta = global_order.index(row) + 1 - rank
        assert move == ("=" if delta == 0 else f"\u2191{delta}" if delta > 0 else f"\u2193{-delta}")
    assert rows != global_order[:10]  # the switch changed the order

    page.locator("button.result").nth(9).click()
    page.wait_for_selector("#explanation img.figure")
    page.wait_for_function(
        "[...document.querySelectorAll('#explanation img.figure')].every(i => i.complete && i.naturalWidth > 0)"
    )
    page.wait_for_function(FIGURE_IN_VIEW, timeout=5000)


def test_long_class_names_stay_inside_their_cards(served, chromium_page):
    url, _, _, _, _ = served
    page = chromium_page
    page.goto(url + "/")
    page.wait_for_selector("#picker img")
    page.locator("#picker button").nth(0).click()
    page.wait_for_selector("button.result")
    cards = page.evaluate(CARD_BOXES)
    assert len(cards) == 10 and all(c["clipped"] for c in cards)
    for i, a in enumerate(cards):
        assert "Black_footed_Albatross_of_the_very_long_class_names" in a["title"]  # the full name on hover
        assert a["card"][0] - 0.5 <= a["name"][0] and a["name"][2] <= a["card"][2] + 0.5
        for b in cards[i + 1 :]:
            assert not _overlap(a["card"], b["card"]) and not _overlap(a["name"], b["card"])
