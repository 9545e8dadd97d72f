"""The statistics of bench/study.py: paired differences over seeds, and whether a validation curve has stopped rising."""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from scipy.stats import t as student_t

#: the validation metrics logged every epoch, as the curves show them
CURVE_METRICS = ("map_at_r", "recall@1")


@dataclass(frozen=True)
class PairedDifference:
    """``method - baseline`` over the seeds both have: the mean, its 95% t interval, the seeds that improved."""

    mean: float
    low: float
    high: float
    improved: int
    seeds: int

    @property
    def verdict(self) -> str:
        """``helps`` / ``hurts`` when the interval excludes 0, ``no measurable difference`` when it
        holds it, ``-`` with fewer than 2 seeds (no interval)."""
        if self.seeds < 2 or math.isnan(self.low):
            return "-"
        if self.low > 0:
            return "helps"
        if self.high < 0:
            return "hurts"
        return "no measurable difference"

    def cell(self, scale: float = 100.0, digits: int = 2) -> str:
        """``+0.52 [-0.10, +1.14], 4/5 up``: times ``scale`` (100: points), ``digits`` decimals."""
        if self.seeds == 0:
            return "-"
        text = f"{scale * self.mean:+.{digits}f}"
        if self.seeds > 1:
            text += f" [{scale * self.low:+.{digits}f}, {scale * self.high:+.{digits}f}]"
        return f"{text}, {self.improved}/{self.seeds} up"


def paired_difference(method: dict[int, float], baseline: dict[int, float], level: float = 0.95) -> PairedDifference:
    """Per-seed differences ``method[s] - baseline[s]`` over the seeds in both (NaN values left
    out), with the ``level`` confidence interval of their mean from the t distribution with
    ``n - 1`` degrees of freedom: ``mean +- t_{(1+level)/2, n-1} sd / sqrt(n)``."""
    diffs = [
        method[s] - baseline[s]
        for s in sorted(set(method) & set(baseline))
        if not (math.isnan(method[s]) or math.isnan(baseline[s]))
    ]
    n = len(diffs)
    if n == 0:
        return PairedDifference(math.nan, math.nan, math.nan, 0, 0)
    mean = statistics.mean(diffs)
    if n == 1:
        low = high = math.nan
    else:
        half = float(student_t.ppf((1 + level) / 2, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
        low, high = mean - half, mean + half
    return PairedDifference(mean, low, high, sum(d > 0 for d in diffs), n)


def validation_curve(run_folder: Path) -> dict[str, list[float]]:
    """The validation metrics of every epoch of a run, ``{metric: [epoch 1, epoch 2, ...]}``, from
    its ``logs/version_*/metrics.csv`` (a resumed run's later logs replace an epoch logged twice)."""
    by_epoch: dict[int, dict[str, float]] = {}
    versions = sorted(run_folder.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    for path in versions:
        with open(path) as f:
            for row in csv.DictReader(f):
                values = {m: row.get(f"val/{m}") for m in CURVE_METRICS}
                if row.get("epoch") and all(values.values()):
                    by_epoch[int(float(row["epoch"]))] = {m: float(v) for m, v in values.items() if v}
    epochs = sorted(by_epoch)
    return {m: [by_epoch[e][m] for e in epochs] for m in CURVE_METRICS}


def mean_curve(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    """Mean and standard deviation per epoch over the seeds' curves (cut to the shortest)."""
    length = min((len(c) for c in curves), default=0)
    columns = [[c[e] for c in curves] for e in range(length)]
    return (
        [statistics.mean(v) for v in columns],
        [statistics.stdev(v) if len(v) > 1 else 0.0 for v in columns],
    )


def stopped_rising(curves: list[list[float]]) -> tuple[str, int]:
    """Whether the seeds' mean validation curve has stopped rising, and its best epoch (1-based).

    Stopped when the best epoch of the mean curve is not one of the last two, or when the rise
    over the last three epochs (twice the least-squares slope through them) is no larger than
    the noise of the last epoch's mean (the standard deviation over seeds / sqrt(seeds); 0 for
    one seed). ``too short`` under 3 epochs, else ``stopped`` or ``still rising``."""
    mean, std = mean_curve(curves)
    if not mean:
        return "no curve", 0
    best = max(range(len(mean)), key=lambda e: mean[e]) + 1
    if len(mean) < 3:
        return "too short", best
    if best <= len(mean) - 2:
        return "stopped", best
    a, _, c = mean[-3:]
    rise = c - a  # 2 x the least-squares slope of three equally spaced points
    noise = std[-1] / math.sqrt(len(curves)) if len(curves) > 1 else 0.0
    return ("stopped" if rise <= noise else "still rising"), best
