"""The tables and figures of bench/study.py, from its per-seed results."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
from cub50 import mean_std
from study_stats import mean_curve, paired_difference, stopped_rising

COLUMNS = ["recall@1", "recall@2", "recall@4", "recall@8", "r_precision", "map_at_r", "nmi"]
LABELS = {
    "baseline": "baseline (MultiSimilarity)",
    "proxyanchor": "baseline with ProxyAnchor (`loss.name=proxyanchor`)",
    "structural": "structural training (`loss.similarity=structural`, 4x4)",
    "grouping": "attentive groups (`model.groups=4`)",
    "grouping-flatstart": "attentive groups, near-uniform start (`model.group_query_std=0.1`)",
    "introspective": "introspective (`loss.similarity=introspective`)",
    "grouping-flatstart+structural": "groups (near-uniform start) + structural training (own 4x4 DIML head)",
    "grouping-flatstart+introspective": "groups (near-uniform start) + introspective",
}
SCORES = {
    "top1_cosine": "top-1 cosine",
    "margin": "margin s1 - s2",
    "knn_density": "kNN density (mean cosine of 10)",
    "uncertainty": "IDML -‖u_q‖",
    "pair_uncertainty": "IDML pair -‖u_q - u_n‖²",
    "pair_uncertainty_sum": "IDML pair -(‖u_q‖ + ‖u_n‖)",
    "all": "every query kept (no score)",
    "oracle": "oracle (the hits first)",
}
TRAINING_FREE = ("top1_cosine", "margin", "knn_density")
UNCERTAINTY = ("uncertainty", "pair_uncertainty", "pair_uncertainty_sum")


def rows(runs: dict[str, dict[int, dict]], k: int, domain) -> list[tuple[str, str, dict[int, dict]]]:
    """``(name, label, {seed: metrics})`` of every row: each method's global ranking, and after it
    the re-ranked one where the method's runs were re-ranked (NMI: the embedding's, not a ranking's)."""
    out = []
    for m, by_seed in runs.items():
        label = domain.untrained if m == "imagenet" else LABELS.get(m, m)
        out.append((m, label, {s: r["global"] for s, r in by_seed.items()}))
        if all("rerank" in r for r in by_seed.values()):
            label = (
                f"baseline + training-free structural re-ranking of the top {k}"
                if m == "baseline"
                else f"{LABELS.get(m, m)} + structural re-ranking of the top {k}"
            )
            reranked = {s: {**r["rerank"], "nmi": math.nan} for s, r in by_seed.items()}
            out.append((f"{m}+rerank", label, reranked))
    return out


def accuracy_table(runs: dict, k: int, domain) -> str:
    base_speed = [r["train_images_per_s"] for r in runs.get("baseline", {}).values()]
    base = statistics.mean(base_speed) if base_speed else math.nan
    lines = [
        "| method | seeds | R@1 | R@2 | R@4 | R@8 | RP | MAP@R | NMI | train img/s vs baseline | validation MAP@R curve |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label, by_seed in rows(runs, k, domain):
        method = name.removesuffix("+rerank")
        values = list(by_seed.values())[:1] if method == "imagenet" else list(by_seed.values())
        cells = [mean_std([m[c] for m in values]) for c in COLUMNS]
        speed, curve = "-", "-"
        if method != "imagenet":
            ips = [r["train_images_per_s"] for r in runs[method].values()]
            ratio = statistics.mean(ips) / base if ips else math.nan
            speed = f"{ratio:.2f}x" if ratio == ratio else "-"
            state, best = stopped_rising([r["curve"]["map_at_r"] for r in runs[method].values()])
            epochs = min(len(r["curve"]["map_at_r"]) for r in runs[method].values())
            curve = f"{state} (best epoch {best} of {epochs})"
        seeds = "-" if method == "imagenet" else str(len(by_seed))
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + f" | {speed} | {curve} |")
    return "\n".join(lines)


def difference_table(runs: dict, k: int, domain) -> str:
    baseline = {s: r["global"] for s, r in runs["baseline"].items()}
    lines = [
        "| method | R@1 - baseline [95% CI], seeds up | R@1 | MAP@R - baseline [95% CI], seeds up | MAP@R |",
        "|---|---|---|---|---|",
    ]
    for name, label, by_seed in rows(runs, k, domain):
        if name == "baseline":
            continue
        cells = []
        for metric in ("recall@1", "map_at_r"):
            d = paired_difference(
                {s: m[metric] for s, m in by_seed.items()}, {s: m[metric] for s, m in baseline.items()}
            )
            cells += [d.cell(), d.verdict]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def confidence_section(runs: dict) -> str:
    models = [m for m, by in runs.items() if all("confidence" in r for r in by.values())]
    if not models:
        return ""
    lines = [
        "**Which answers to trust** (test images as queries; higher confidence should mean an R@1 hit): "
        "the AUROC of each confidence for an R@1 miss, the area under its risk-coverage curve (R@1 of "
        "the most confident queries against the share kept; every query kept gives the R@1) and the R@1 "
        "of the most confident half and 80%. Mean ± std over seeds. Below the table, each uncertainty "
        "readout's AUROC minus that of the best training-free confidence, paired by seed (95% CI; up: "
        "the seeds where the uncertainty predicts the misses better).",
        "",
        "| model | confidence | failure AUROC | risk-coverage area | R@1, 50% kept | R@1, 80% kept |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = []
    for m in models:
        by_seed = runs[m]
        for score in (*TRAINING_FREE, *UNCERTAINTY, "all", "oracle"):
            values = [r["confidence"][score] for r in by_seed.values()]
            cells = [mean_std([v[c] for v in values]) for c in ("auroc", "area", "recall@1_at_0.5", "recall@1_at_0.8")]
            cells[0] = mean_std([v["auroc"] for v in values], 1, 3)
            lines.append(f"| {LABELS.get(m, m)} | {SCORES[score]} | " + " | ".join(cells) + " |")
        best = max(
            TRAINING_FREE, key=lambda sc: statistics.mean(r["confidence"][sc]["auroc"] for r in by_seed.values())
        )
        for score in UNCERTAINTY:
            d = paired_difference(
                {s: r["confidence"][score]["auroc"] for s, r in by_seed.items()},
                {s: r["confidence"][best]["auroc"] for s, r in by_seed.items()},
            )
            answer = {
                "helps": "adds to",
                "hurts": "is worse than",
                "no measurable difference": "adds nothing measurable to",
            }.get(d.verdict, "cannot be judged (one seed) against")
            verdicts.append(
                f"- {LABELS.get(m, m)}: {SCORES[score]} {answer} the best training-free confidence "
                f"({SCORES[best]}): failure AUROC {d.cell(scale=1, digits=3)}."
            )
    return "\n".join([*lines, "", *verdicts])


def pck_section(runs: dict, domain) -> str:
    if not domain.keypoints:
        return (
            f"**Keypoint transfer**: not measured on {domain.title.split(':')[0]}: the images have no part keypoints."
        )
    if not all(m in runs and all("pck" in r for r in runs[m].values()) for m in ("baseline", "structural")):
        return ""
    base = {s: r["pck"] for s, r in runs["baseline"].items()}
    trained = {s: r["pck"] for s, r in runs["structural"].items()}
    d = paired_difference(trained, base)
    return "\n".join(
        [
            "**Keypoint transfer**: PCK@0.1 of keypoints moved through each model's transport plan "
            "(the same same-class test pairs for every model).",
            "",
            "| plan | seeds | PCK@0.1 | structural - training-free [95% CI], seeds up |",
            "|---|---|---|---|",
            f"| training-free plan on the baseline | {len(base)} | {mean_std(list(base.values()), 1, 3)} | |",
            f"| plan after structural training | {len(trained)} | {mean_std(list(trained.values()), 1, 3)} | "
            f"{d.cell(scale=1, digits=3)} ({d.verdict}) |",
        ]
    )


def sharpness_section(runs: dict) -> str:
    models = [m for m, by in runs.items() if all("sharpness" in r for r in by.values())]
    if not models:
        return ""
    first = runs[models[0]][next(iter(runs[models[0]]))]["sharpness"]
    lines = [
        f"**Group sharpness**: how many of the {first['positions']} feature-map positions hold "
        f"{100 * first['mass']:.0f}% of each group's attention (mean over test images, then over seeds), "
        f"the widest group, whether every group is sharp (at most {first['sharp']:g} positions), the "
        "perplexity (effective positions), R@1 and its paired difference to the baseline.",
        "",
        "| model | seeds | positions per group | widest | every group sharp | effective positions | R@1 | "
        "R@1 - baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    baseline = {s: r["global"]["recall@1"] for s, r in runs.get("baseline", {}).items()}
    for m in models:
        by_seed = runs[m]
        groups = list(next(iter(by_seed.values()))["sharpness"]["groups"])
        per_group = " / ".join(
            f"{statistics.mean(r['sharpness']['groups'][g]['mass_positions'] for r in by_seed.values()):.1f}"
            for g in groups
        )
        effective = " / ".join(
            f"{statistics.mean(r['sharpness']['groups'][g]['effective_positions'] for r in by_seed.values()):.1f}"
            for g in groups
        )
        widest = mean_std([r["sharpness"]["widest"] for r in by_seed.values()], 1, 1)
        sharp = sum(r["sharpness"]["all_sharp"] for r in by_seed.values())
        r1 = mean_std([r["global"]["recall@1"] for r in by_seed.values()])
        d = paired_difference({s: r["global"]["recall@1"] for s, r in by_seed.items()}, baseline)
        lines.append(
            f"| {LABELS.get(m, m)} | {len(by_seed)} | {per_group} | {widest} | {sharp}/{len(by_seed)} seeds | "
            f"{effective} | {r1} | {d.cell()} ({d.verdict}) |"
        )
    return "\n".join(lines)


def render(domain, runs: dict, args, command: str, machine: str, minutes: float, figures: list[str]) -> str:
    """The markdown of the study: its command, the tables, and the ``figures`` (file names beside the page)."""
    seeds = " ".join(map(str, args.seeds))
    cache = f", `trainer.cache_features={args.cache_features}`" if args.cache_features else ""
    parts = [
        f"Measured by `{command}` on {machine}; {minutes:.0f} min (finished runs reused). `{domain.preset}` "
        f"preset, up to {args.epochs} epochs{cache}, each run's epoch selected by validation MAP@R; "
        f"seeds {seeds}. Percentages; mean ± std over seeds. A paired difference compares each seed with "
        "the baseline of the same seed (95% t interval over seeds): it helps or hurts when the interval "
        "excludes 0. The curve column says whether the seeds' mean validation MAP@R had stopped rising "
        "(best epoch not among the last two, or a rise over the last three epochs within the seeds' "
        "noise); the curves are in the figure below the tables.",
        "",
        accuracy_table(runs, args.rerank_k, domain),
        "",
        difference_table(runs, args.rerank_k, domain) if "baseline" in runs else "",
    ]
    for section in (confidence_section(runs), pck_section(runs, domain), sharpness_section(runs)):
        if section:
            parts += ["", section]
    for name in figures:
        what = "Validation curves" if "curves" in name else "Risk-coverage of the confidences"
        parts += ["", f"![{what}, {domain.title}]({name})"]
    return "\n".join(parts)


def curves_figure(runs: dict, domain, path: Path) -> Path:
    """Validation MAP@R and R@1 per epoch of every trained method, mean ± std over seeds."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from glassmetric.explain.figures import save_figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric, title in zip(axes, ("map_at_r", "recall@1"), ("validation MAP@R", "validation R@1"), strict=True):
        for m, by_seed in runs.items():
            if m == "imagenet":
                continue
            mean, std = mean_curve([r["curve"][metric] for r in by_seed.values()])
            if not mean:
                continue
            x = np.arange(1, len(mean) + 1)
            (line,) = ax.plot(x, 100 * np.array(mean), marker="o", ms=3, label=m)
            ax.fill_between(
                x, 100 * (np.array(mean) - std), 100 * (np.array(mean) + std), color=line.get_color(), alpha=0.15
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{title} (%)")
        ax.grid(color="0.9")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Validation curves, {domain.title} (mean ± std over seeds)", fontsize=10)
    return save_figure(fig, path)


def risk_coverage_figure(runs: dict, domain, path: Path) -> Path:
    """R@1 of the most confident queries against the share kept, per confidence, of the
    introspective model (mean over seeds)."""
    from matplotlib.figure import Figure

    from glassmetric.explain.figures import save_figure

    m = (
        "introspective"
        if "introspective" in runs
        else next(m for m, by in runs.items() if all("kept_recall" in r for r in by.values()))
    )
    by_seed = runs[m]
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    names = list(next(iter(by_seed.values()))["kept_recall"])
    grid = np.linspace(0, 1, 51)[1:]
    for name in names:
        curve = np.mean([r["kept_recall"][name] for r in by_seed.values()], axis=0)
        style = {"ls": "--", "color": "0.4"} if name == "oracle" else {"ls": "-" if name in UNCERTAINTY else ":"}
        ax.plot(100 * grid, 100 * curve, label=SCORES.get(name, name), **style)
    ax.set_xlabel("queries kept, most confident first (%)")
    ax.set_ylabel("R@1 of the kept queries (%)")
    ax.grid(color="0.9")
    ax.legend(fontsize=7)
    ax.set_title(f"Risk-coverage, {LABELS.get(m, m)}\n{domain.title}", fontsize=9)
    return save_figure(fig, path)
