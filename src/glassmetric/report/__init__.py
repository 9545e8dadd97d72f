"""The static HTML retrieval report (``glassmetric report``): metrics, the re-ranking K-sweep,
the worst / random / best queries with their top results and each pair's explanation.

:mod:`.build` computes and writes it, :mod:`.html` renders the page, :mod:`.plots` the
K-sweep figure, :mod:`.queries` picks the queries shown, :mod:`.rankings` re-ranks one query
as ``glassmetric eval --rerank structural`` does (also the explorer's re-ranking).
"""

from glassmetric.report.build import build_report

__all__ = ["build_report"]
