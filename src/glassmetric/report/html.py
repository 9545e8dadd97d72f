"""The report page: one self-contained HTML file (inline CSS and JavaScript, no network),
images as files beside it. Clicking a result opens its explanation in a dialog."""

from __future__ import annotations

import html
from pathlib import Path

from glassmetric.report.data import QueryRow, ReportData, Result
from glassmetric.retrieval.metrics import _short_name

__all__ = ["write_html"]

GROUP_TITLES = {
    "worst": "Worst queries (R@1 failures, lowest AP@R first)",
    "random": "A random sample of queries",
    "best": "Best queries (R@1 hits, highest AP@R first)",
}
SCORE_NAMES = {
    "global": "global cos",
    "structural": "structural SS",
    "multiscale": "cos + SS",
    "introspective": "introspective D",
    "uncertainty": "uncertainty ||u||",
}

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0; color: #222; background: #f6f6f4; }
header { background: #253746; color: #fff; padding: 14px 24px; }
header h1 { margin: 0 0 4px; font-size: 20px; }
header p { margin: 2px 0; font-size: 13px; opacity: 0.85; }
main { padding: 8px 24px 40px; }
section { background: #fff; border-radius: 6px; padding: 10px 16px; margin: 14px 0; box-shadow: 0 1px 2px #0002; }
h2 { font-size: 17px; margin: 6px 0 10px; }
table.metrics { border-collapse: collapse; font-size: 13px; }
table.metrics th, table.metrics td { padding: 3px 10px; text-align: right; border-bottom: 1px solid #e3e3e3; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
.sweep { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
.query { display: flex; gap: 10px; align-items: flex-start; padding: 8px 0; border-bottom: 1px solid #eee; }
.query:last-child { border-bottom: none; }
.qcard { width: 118px; flex: none; font-size: 11.5px; }
.qcard img { width: 112px; height: 112px; object-fit: cover; border: 3px solid #253746; image-rendering: auto; }
.results { display: flex; gap: 6px; flex-wrap: wrap; }
button.result { all: unset; cursor: pointer; width: 96px; font-size: 10.5px; line-height: 1.25; }
button.result img { width: 90px; height: 90px; object-fit: cover; border: 3px solid; display: block; }
button.result.hit img { border-color: #1a9850; }
button.result.miss img { border-color: #d73027; }
button.result:hover img, button.result:focus img { outline: 2px solid #2a7f9e; }
.mark { font-weight: bold; }
.hit .mark { color: #1a9850; }
.miss .mark { color: #d73027; }
.scores { color: #555; }
dialog { max-width: min(1200px, 96vw); border: none; border-radius: 8px; box-shadow: 0 4px 24px #0006; padding: 14px 18px; }
dialog::backdrop { background: #0008; }
dialog img { max-width: 100%; display: block; margin: 8px auto; }
dialog pre { background: #f3f3f3; padding: 6px 10px; font-size: 13px; white-space: pre-wrap; }
dialog .close { float: right; font-size: 15px; }
.legend { font-size: 12px; color: #555; }
"""

JS = """
const dialog = document.getElementById('explain');
document.querySelectorAll('button.result').forEach(b => b.addEventListener('click', () => {
  const source = document.getElementById(b.dataset.pair);
  document.getElementById('explain-body').innerHTML = source.innerHTML;
  dialog.showModal();
}));
document.getElementById('explain-close').addEventListener('click', () => dialog.close());
dialog.addEventListener('click', e => { if (e.target === dialog) dialog.close(); });
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _pct(v: float) -> str:
    return "nan" if v != v else f"{100 * v:.2f}"


def _metrics_table(rows: dict[str, dict[str, float]]) -> str:
    names = list(next(iter(rows.values())))
    head = "".join(f"<th>{_e(_short_name(m))}</th>" for m in names)
    body = "".join(
        f"<tr><td>{_e(row)}</td>" + "".join(f"<td>{_pct(v.get(m, float('nan')))}</td>" for m in names) + "</tr>"
        for row, v in rows.items()
    )
    return f'<table class="metrics"><tr><th></th>{head}</tr>{body}</table>'


def _result(q: QueryRow, r: Result, group: str) -> tuple[str, str]:
    pair_id = f"pair-{group}-{q.index}-{r.rank}"
    scores = "<br>".join(f"{_e(SCORE_NAMES.get(k, k))} {v:.3f}" for k, v in r.scores.items())
    cls = "hit" if r.correct else "miss"
    mark = "&#10003; correct" if r.correct else "&#10007; wrong"
    card = (
        f'<button class="result {cls}" data-pair="{pair_id}" title="explain this pair">'
        f'<img src="{_e(r.image)}" alt="result {r.rank}"><span class="mark">#{r.rank} {mark}</span><br>'
        f'{_e(r.label)}<br><span class="scores">{scores}</span></button>'
    )
    figures = "".join(
        f'<h4>{_e(kind)}</h4><img src="{_e(path)}" alt="{_e(kind)} explanation" loading="lazy">'
        for kind, path in r.figures.items()
    )
    words = "\n".join(r.lines)
    detail = (
        f'<div id="{pair_id}" hidden><h3>query {q.index} ({_e(q.label)}) and result #{r.rank}: gallery image '
        f"{r.index} ({_e(r.label)}), {'correct' if r.correct else 'wrong'}</h3><pre>{_e(words)}</pre>{figures}</div>"
    )
    return card, detail


def _query_row(q: QueryRow, group: str) -> tuple[str, list[str]]:
    cards, details = [], []
    for r in q.results:
        card, detail = _result(q, r, group)
        cards.append(card)
        details.append(detail)
    u = "" if q.uncertainty is None else f"<br>uncertainty {q.uncertainty:.3g}"
    info = (
        f'<div class="qcard"><img src="{_e(q.image)}" alt="query {q.index}"><br><b>query {q.index}</b><br>'
        f"{_e(q.label)}<br>R@1 {'hit' if q.hit_at_1 else 'miss'}, AP@R {q.ap_at_r:.3f}{u}</div>"
    )
    return f'<div class="query">{info}<div class="results">{"".join(cards)}</div></div>', details


def write_html(report: ReportData, path: Path) -> Path:
    """Write the page of ``report`` to ``path`` and return it."""
    sections, details = [], []
    sections.append(f"<section><h2>Metrics (global ranking)</h2>{_metrics_table({'global': report.metrics})}</section>")
    if report.sweep is not None:
        sweep_rows = {("K=0 (global)" if k == 0 else f"K={k}"): v for k, v in report.sweep.items()}
        img = (
            f'<img src="{_e(report.sweep_image)}" alt="K-sweep of structural re-ranking" width="600">'
            if report.sweep_image
            else ""
        )
        sections.append(
            f'<section><h2>Structural re-ranking: the K-sweep</h2><div class="sweep">{img}'
            f"{_metrics_table(sweep_rows)}</div></section>"
        )
    for group, rows in report.groups.items():
        if not rows:
            continue
        body = []
        for q in rows:
            row, d = _query_row(q, group)
            body.append(row)
            details += d
        sections.append(
            f'<section id="{group}"><h2>{_e(GROUP_TITLES.get(group, group))}</h2>'
            '<p class="legend">Top results by the global score; green: same class as the query, '
            "red: another class. Click a result for its explanation.</p>" + "".join(body) + "</section>"
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(report.title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body><header><h1>{_e(report.title)}</h1>
<p>checkpoint {_e(report.checkpoint)}</p><p>data: {_e(report.data)}: {report.n_queries} queries, {report.n_gallery} gallery images</p>
<p>model: {_e(report.model)}</p></header>
<main>{"".join(sections)}</main>
<dialog id="explain"><button class="close" id="explain-close">close &#10005;</button><div id="explain-body"></div></dialog>
{"".join(details)}
<script>{JS}</script></body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path
