"""What the HTML report shows, as data: the metrics, the K-sweep and the chosen queries with
their results (written by :mod:`glassmetric.report.build`, drawn by :mod:`glassmetric.report.html`)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["QueryRow", "ReportData", "Result"]


@dataclass
class Result:
    rank: int  #: 1-based, by the global score
    index: int  #: position of the image in the gallery data set
    image: str  #: path relative to the report folder
    label: str
    correct: bool
    scores: dict[str, float]  #: "global", and "structural", "multiscale", "introspective", "uncertainty" when present
    figures: dict[str, str] = field(default_factory=dict)  #: kind ("flows", "groups") -> relative path
    lines: list[str] = field(default_factory=list)  #: the explanation in words


@dataclass
class QueryRow:
    index: int  #: position of the query image in its data set
    image: str
    label: str
    hit_at_1: bool
    ap_at_r: float
    uncertainty: float | None
    results: list[Result]


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
