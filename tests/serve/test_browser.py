"""End to end in headless Chromium: load the explorer, upload a query, see the results, open an
explanation, pick a gallery query, get the message for a refused upload; a screenshot is saved."""

import pytest
from serve_runs import fit_idml, write_gallery
from server_thread import ServerThread

from glassmetric.serve.app import create_app
from glassmetric.serve.explorer import Explorer

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def served(browser_available, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    checkpoint = fit_idml(root / "run")
    paths = write_gallery(root / "gallery", 16)
    explorer = Explorer.open(str(checkpoint), root / "gallery", cache_dir=root / "cache", progress=False)
    with ServerThread(create_app(explorer)) as url:
        yield url, paths, root


def test_upload_search_and_explain_in_the_browser(served, chromium_page, tmp_path):
    url, paths, root = served
    page = chromium_page
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("#picker img")
    assert "16 images" in page.text_content("#info")

    page.set_input_files("#upload", str(paths[5]))
    page.click("#search-upload")
    page.wait_for_selector("button.result")
    results = page.locator("button.result")
    assert results.count() == 10
    assert "#1" in results.nth(0).inner_text() and "global cos 1.000" in results.nth(0).inner_text()  # itself

    results.nth(1).click()
    page.wait_for_selector("#explanation img.figure")
    page.wait_for_function(
        "[...document.querySelectorAll('#explanation img.figure')].every(i => i.complete && i.naturalWidth > 500)"
    )
    assert "structural" in page.text_content("#explanation pre")
    shot = tmp_path / "explorer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000

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
