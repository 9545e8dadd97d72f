"""What the HTML report shows, as data: the metrics, the K-sweep and the chosen queries with
their results (written by :mod:`glassmetric.report.build`, drawn by :mod:`glassmetric.report.html`)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["QueryRow", "ReportData", "Result"]


@dataclass
class Result:
    rank: int  #: 1-based, in the ranking the result is listed in (global or re-ranked)
    index: int  #: position of the image in the gallery data set
    image: str  #: path relative to the report folder
    name: str  #: the image's file name (or "image <index>")
    label: str
    correct: bool
    scores: dict[str, float]  #: "global", and "structural", "multiscale", "introspective", "uncertainty" when present
    score: float  #: the score that ordered the ranking: "global", or "multiscale" in the re-ranked one
    figures: dict[str, str] = field(default_factory=dict)  #: kind ("flows", "groups") -> relative path
    lines: list[str] = field(default_factory=list)  #: the explanation in words
    global_rank: int | None = None  #: in the re-ranked list: the rank under the global ranking
    move: int | None = None  #: in the re-ranked list: global rank minus rank (positive: moved up)


@dataclass
class QueryRow:
    index: int  #: position of the query image in its data set
    image: str
    name: str  #: the query's file name (or "image <index>")
    label: str
    hit_at_1: bool
    ap_at_r: float
    uncertainty: float | None
    results: list[Result]  #: the global top results
    reranked: list[Result] = field(default_factory=list)  #: the top results after structural re-ranking
    rerank_k: int = 0  #: the global top-K re-ranked (0: no re-ranking)

    @property
    def hit_after_rerank(self) -> bool | None:
        """Whether the first re-ranked result is of the query's class (None without re-ranking)."""
        return self.reranked[0].correct if self.reranked else None


@dataclass
class ReportData:
    title: str
    checkpoint: str
    data: str
    model: str
    metrics: dict[str, float]
    sweep: dict[int, dict[str, float]] | None
    sweep_image: str | None
    groups: dict[str, list[QueryRow]]
    n_queries: int
    n_gallery: int
