"""The report page: one self-contained HTML file (inline CSS and JavaScript, no network),
images as files beside it. Each shown query has its global top results and, beside them, its
top results after structural re-ranking with each one's rank move; clicking a result opens its
explanation in a dialog that fits the window."""

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
    "global": "cos",
    "structural": "SS",
    "multiscale": "cos + SS",
    "introspective": "introspective distance",
    "uncertainty": "uncertainty",
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
.query { display: flex; gap: 14px; align-items: flex-start; padding: 10px 0; border-bottom: 1px solid #eee; }
.query:last-child { border-bottom: none; }
.qcard { width: 118px; flex: none; font-size: 11.5px; overflow-wrap: anywhere; }
.qcard img { width: 112px; height: 112px; object-fit: cover; border: 3px solid #253746; image-rendering: auto; }
.verdict { display: inline-block; margin-top: 3px; padding: 1px 5px; border-radius: 3px; font-weight: bold; }
.verdict.fixed { background: #d9f0d3; color: #1a7837; } .verdict.broken { background: #fddbc7; color: #b2182b; }
.verdict.same { background: #eee; color: #444; }
.rankings { display: flex; gap: 18px; flex-wrap: wrap; align-items: flex-start; }
.ranking { max-width: 510px; } .ranking h4 { margin: 0 0 4px; font-size: 12.5px; }
.results { display: grid; grid-template-columns: repeat(5, 96px); gap: 6px; }
button.result { all: unset; cursor: pointer; width: 96px; font-size: 10.5px; line-height: 1.25; overflow: hidden; }
button.result img { width: 90px; height: 90px; object-fit: cover; border: 3px solid; display: block; }
button.result .name { display: -webkit-box; -webkit-line-clamp: 2; -webkit-box-orient: vertical; overflow: hidden;
  overflow-wrap: anywhere; }
button.result .score { font-weight: bold; }
button.result.hit img { border-color: #1a9850; }
button.result.miss img { border-color: #d73027; }
button.result:hover img, button.result:focus img { outline: 2px solid #2a7f9e; }
.mark { font-weight: bold; }
.hit .mark { color: #1a9850; }
.miss .mark { color: #d73027; }
.move { font-weight: bold; margin-left: 3px; } .move.up { color: #1a9850; } .move.down { color: #d73027; }
.move.same { color: #888; }
.scores { color: #555; }
dialog { max-width: min(1200px, 96vw); max-height: 94vh; box-sizing: border-box; border: none; border-radius: 8px;
  box-shadow: 0 4px 24px #0006; padding: 12px 18px; overflow: auto; }
dialog::backdrop { background: #0008; }
dialog h3 { margin: 4px 0 6px; font-size: 15px; }
dialog img { max-width: 100%; max-height: calc(94vh - 110px); object-fit: contain; display: block; margin: 6px auto; }
dialog pre { background: #f3f3f3; padding: 6px 10px; font-size: 13px; white-space: pre-wrap; }
dialog .close { float: right; font-size: 15px; }
.legend { font-size: 12px; color: #555; }
.delta { color: #666; font-size: 11.5px; }
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


def _metrics_table(rows: dict[str, dict[str, float]], baseline: dict[str, float] | None = None) -> str:
    """Metrics in percent, one row per entry; with ``baseline``, each value's change against it
    in points beside it."""
    names = list(next(iter(rows.values())))
    head = "".join(f"<th>{_e(_short_name(m))}</th>" for m in names)

    def cell(v: dict[str, float], m: str) -> str:
        value = v.get(m, float("nan"))
        if baseline is None or v is baseline:
            return f"<td>{_pct(value)}</td>"
        delta = 100 * (value - baseline.get(m, float("nan")))
        return f'<td>{_pct(value)} <span class="delta">({delta:+.2f})</span></td>'

    body = "".join(f"<tr><td>{_e(row)}</td>" + "".join(cell(v, m) for m in names) + "</tr>" for row, v in rows.items())
    return f'<table class="metrics"><tr><th></th>{head}</tr>{body}</table>'


def _move(r: Result) -> str:
    if r.move is None:
        return ""
    title = f' title="global rank #{r.global_rank}"'
    if r.move > 0:
        return f'<span class="move up"{title}>&#8593;{r.move}</span>'
    if r.move < 0:
        return f'<span class="move down"{title}>&#8595;{-r.move}</span>'
    return f'<span class="move same"{title}>=</span>'


def _pair_id(group: str, q: QueryRow, r: Result) -> str:
    return f"pair-{group}-{q.index}-{r.index}"


def _card(q: QueryRow, r: Result, group: str, ordered_by: str) -> str:
    others = "<br>".join(
        f"{_e(SCORE_NAMES.get(k, k))} {v:.3f}"
        for k, v in r.scores.items()
        if k != ordered_by and (ordered_by == "multiscale" or k != "multiscale")
    )
    cls = "hit" if r.correct else "miss"
    mark = "&#10003;" if r.correct else "&#10007;"
    return (
        f'<button class="result {cls}" data-pair="{_pair_id(group, q, r)}" title="{_e(r.label)}: {_e(r.name)}">'
        f'<img src="{_e(r.image)}" alt="result {r.rank}"><span class="mark">#{r.rank} {mark}</span>{_move(r)}'
        f'<span class="name">{_e(r.label)}</span>'
        f'<span class="score" data-value="{r.score!r}">{_e(SCORE_NAMES[ordered_by])} {r.score:.3f}</span>'
        f'<br><span class="scores">{others}</span></button>'
    )


def _detail(q: QueryRow, r: Result, group: str) -> str:
    """The dialog's content for one pair: what it is, then its figures, which state the scores;
    the explanation in words is the figures' alternative text (shown only when there is no figure)."""
    words = "\n".join(r.lines)
    figures = "".join(
        f'<img src="{_e(path)}" alt="{_e(kind)} explanation: {_e(words)}" loading="lazy">'
        for kind, path in r.figures.items()
    )
    ranks = [
        f"#{x.rank} {name}"
        for name, rows in (("global", q.results), ("re-ranked", q.reranked))
        for x in rows
        if x.index == r.index
    ]
    return (
        f'<div id="{_pair_id(group, q, r)}" hidden><h3>query {_e(q.name)} ({_e(q.label)}) and {_e(r.name)} '
        f"({_e(r.label)}, {'correct' if r.correct else 'wrong'}; {', '.join(ranks)})</h3>"
        f"{figures or f'<pre>{_e(words)}</pre>'}</div>"
    )


def _verdict(q: QueryRow) -> str:
    """Whether re-ranking changed the query's R@1: fixed, broken or the same."""
    after = q.hit_after_rerank
    if after is None:
        return ""
    if after != q.hit_at_1:
        cls, text = ("fixed", "re-ranking fixes R@1") if after else ("broken", "re-ranking loses R@1")
    else:
        cls, text = "same", "R@1 " + ("hit" if after else "miss") + " after re-ranking too"
    return f'<br><span class="verdict {cls}">{text}</span>'


def _query_row(q: QueryRow, group: str, details: dict[str, str]) -> str:
    columns = [(f"Global top {len(q.results)}", "(by cos)", q.results, "global")]
    if q.reranked:
        columns.append(
            (
                f"Re-ranked top {len(q.reranked)}",
                f"(by cos + SS after structural re-ranking of the global top {q.rerank_k}; "
                "arrows: move against the global rank)",
                q.reranked,
                "multiscale",
            )
        )
    blocks = []
    for title, what, rows, ordered_by in columns:
        for r in rows:
            details.setdefault(_pair_id(group, q, r), _detail(q, r, group))
        cards = "".join(_card(q, r, group, ordered_by) for r in rows)
        blocks.append(
            f'<div class="ranking" data-ordered-by="{ordered_by}"><h4>{_e(title)} '
            f'<span class="legend">{_e(what)}</span></h4><div class="results">{cards}</div></div>'
        )
    u = "" if q.uncertainty is None else f"<br>uncertainty {q.uncertainty:.3g}"
    info = (
        f'<div class="qcard" title="{_e(q.name)}"><img src="{_e(q.image)}" alt="query {_e(q.name)}"><br>'
        f'<b class="qname">{_e(q.name)}</b><br>{_e(q.label)}<br>'
        f"R@1 {'hit' if q.hit_at_1 else 'miss'}, AP@R {q.ap_at_r:.3f}{u}{_verdict(q)}</div>"
    )
    return f'<div class="query" data-query="{q.index}">{info}<div class="rankings">{"".join(blocks)}</div></div>'


def write_html(report: ReportData, path: Path) -> Path:
    """Write the page of ``report`` to ``path`` and return it."""
    sections: list[str] = []
    details: dict[str, str] = {}
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
            f"{_metrics_table(sweep_rows, report.sweep.get(0))}</div>"
            '<p class="legend">Metrics in %; in brackets the change against the global ranking (K=0), '
            "in points.</p></section>"
        )
    for group, rows in report.groups.items():
        if not rows:
            continue
        body = [_query_row(q, group, details) for q in rows]
        sections.append(
            f'<section id="{group}"><h2>{_e(GROUP_TITLES.get(group, group))}</h2>'
            '<p class="legend">Each query\'s top results by the global cosine and, beside them, after '
            "structural re-ranking by cos + SS; green: same class as the query, red: another class. "
            "Click a result for its explanation.</p>" + "".join(body) + "</section>"
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(report.title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body><header><h1>{_e(report.title)}</h1>
<p>checkpoint {_e(report.checkpoint)}</p><p>data: {_e(report.data)}: {report.n_queries} queries, {report.n_gallery} gallery images</p>
<p>model: {_e(report.model)}</p></header>
<main>{"".join(sections)}</main>
<dialog id="explain"><button class="close" id="explain-close">close &#10005;</button><div id="explain-body"></div></dialog>
{"".join(details.values())}
<script>{JS}</script></body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path
