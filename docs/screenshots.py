"""The two screenshots of the README, in headless Chromium (glassmetric.serve.browser):

* docs/explorer.png: `glassmetric serve` on CHECKPOINT (its test split as the gallery), a gallery
  query picked, one of its results explained;
* docs/report.png: the first page of the report in REPORT_DIR with one result's explanation open.

    python docs/screenshots.py --checkpoint runs/demo/checkpoints/best.ckpt --report runs/demo/report
"""

from __future__ import annotations

import argparse
from pathlib import Path

from glassmetric.serve.app import create_app
from glassmetric.serve.browser import chromium_page
from glassmetric.serve.explorer import Explorer
from glassmetric.serve.server import ServerThread

FIGURES_LOADED = "[...document.querySelectorAll('{} img')].every(i => i.complete && i.naturalWidth > 0)"


def explorer_shot(checkpoint: str, query: int, result: int, out: Path) -> None:
    explorer = Explorer.open(checkpoint, None)
    with ServerThread(create_app(explorer)) as url, chromium_page(1400, 1500) as page:
        page.goto(url + "/")
        page.wait_for_selector("#picker img")
        page.locator("#picker button").nth(query).click()
        page.wait_for_selector("button.result")
        page.locator("button.result").nth(result).click()
        page.wait_for_selector("#explanation img.figure")
        page.wait_for_function(FIGURES_LOADED.format("#explanation"))
        page.wait_for_function(FIGURES_LOADED.format("#results"))
        page.screenshot(path=str(out), full_page=False)


def report_shot(report: Path, result: int, out: Path) -> None:
    with chromium_page(1400, 1100) as page:
        page.goto((report / "index.html").resolve().as_uri())
        page.locator("button.result").nth(result).click()
        page.wait_for_selector("dialog[open] img")
        page.wait_for_function(FIGURES_LOADED.format("dialog[open]"))
        page.screenshot(path=str(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="runs/demo/checkpoints/best.ckpt")
    ap.add_argument("--report", type=Path, default=Path("runs/demo/report"))
    ap.add_argument("--query", type=int, default=4, help="gallery image picked in the explorer")
    ap.add_argument("--result", type=int, default=0, help="result explained (0 = the first)")
    args = ap.parse_args()
    docs = Path(__file__).resolve().parent
    explorer_shot(args.checkpoint, args.query, args.result, docs / "explorer.png")
    report_shot(args.report, args.result, docs / "report.png")
    print(f"written {docs / 'explorer.png'} and {docs / 'report.png'}")


if __name__ == "__main__":
    main()
