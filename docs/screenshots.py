"""The two screenshots of docs/explorer.md, in headless Chromium (tests/chromium.py):

* docs/explorer.png: `glassmetric serve` on CHECKPOINT (its test split as the gallery), a gallery
  query picked, its results after structural re-ranking of the global top 50 with their rank
  moves, its first correct result (or its first) explained below them (the whole page);
* docs/report.png: the report page in REPORT_DIR from its top to its first worst query (its global
  and re-ranked results side by side).

    python docs/screenshots.py --checkpoint runs/demo/checkpoints/best.ckpt --report runs/demo/report
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glassmetric.serve.app import create_app
from glassmetric.serve.explorer import Explorer

# the test suite's tooling: headless Chromium and the app served in a thread
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from chromium import chromium_page  # noqa: E402
from server_thread import ServerThread  # noqa: E402

FIGURES_LOADED = "[...document.querySelectorAll('{} img')].every(i => i.complete && i.naturalWidth > 0)"


def explorer_shot(checkpoint: str, query: int, out: Path) -> None:
    explorer = Explorer.open(checkpoint, None)
    with ServerThread(create_app(explorer)) as url, chromium_page(1400, 1000) as page:
        page.goto(url + "/")
        page.wait_for_selector("#picker img")
        page.locator("#picker button").nth(query).click()
        page.wait_for_selector("button.result")
        page.select_option("#rerank-k", "50")
        page.check("input[value=structural]")
        page.wait_for_function("document.querySelector('#results').dataset.orderedBy === 'multiscale'")
        hits = page.locator("button.result.hit")
        (hits.first if hits.count() else page.locator("button.result").first).click()
        page.wait_for_selector("#explanation img.figure")
        page.wait_for_function(FIGURES_LOADED.format("#explanation"))
        page.wait_for_function(FIGURES_LOADED.format("#results"))
        page.screenshot(path=str(out), full_page=True)


def report_shot(report: Path, out: Path) -> None:
    with chromium_page(1400, 1000) as page:
        page.goto((report / "index.html").resolve().as_uri())
        page.wait_for_function(FIGURES_LOADED.format("main"))
        bottom = page.evaluate(
            "(() => { const q = document.querySelector('#worst .query') || document.querySelector('main');"
            " return q.getBoundingClientRect().bottom + window.scrollY + 12; })()"
        )
        page.screenshot(path=str(out), full_page=True, clip={"x": 0, "y": 0, "width": 1400, "height": bottom})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="runs/demo/checkpoints/best.ckpt")
    ap.add_argument("--report", type=Path, default=Path("runs/demo/report"))
    ap.add_argument("--query", type=int, default=14, help="gallery image picked in the explorer (one of the first 60)")
    args = ap.parse_args()
    docs = Path(__file__).resolve().parent
    explorer_shot(args.checkpoint, args.query, docs / "explorer.png")
    report_shot(args.report, docs / "report.png")
    print(f"written {docs / 'explorer.png'} and {docs / 'report.png'}")


if __name__ == "__main__":
    main()
