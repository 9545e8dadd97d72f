"""Real-bird evidence on CUB-50 (../shared/data/cub50, test classes 26-50): does each method help
retrieval, and does its explanation point at the right parts?

    python bench/real_birds.py [--seeds 0 1 2] [--methods baseline structural grouping introspective]
                               [--pairs 2000] [--no-write]

One command for every table and figure of the real-bird section of BENCHMARKS.md:

1. Training. The ``cub50`` preset (ImageNet EfficientNet-Lite0, 224 px, 4 epochs,
   MultiSimilarity, selection on validation classes) per method and seed, through
   :func:`glassmetric.training.fit.fit`; a run whose output folder holds ``done`` and
   ``checkpoints/best.ckpt`` is reused (delete the folder to retrain).
   baseline: the preset; structural: ``model.spatial_grid=4 loss.similarity=structural``
   (DIML loss on the batch's structural similarities); grouping: ``model.groups=4``
   (DGML); introspective: ``model.uncertainty_dim=1280 loss.similarity=introspective`` (IDML).
2. Accuracy. Each checkpoint embedded once (global, local, uncertainty as it has them):
   R@1/2/4/8, NMI, RP, MAP@R of the global ranking; structural re-ranking of the global
   top-K (training-free on checkpoints without a spatial head) for K in ``--ks``; training
   images/s as a ratio to the baseline's.
3. Structural correspondence (``evaluate_correspondence``, ``--pairs`` same-class pairs):
   PCK@0.1 of keypoints moved through the plan, against a uniform plan, uniform marginals,
   nearest-cell matching and the true-cell limit; per part; each part's share of SS.
4. Groups: part assignment of each group's attention peak, mutual information with the parts
   against random maps, group maps on 12 test images.
5. Uncertainty: AUROC for R@1 failure, Spearman with box area share and visible parts, the
   12 most / least uncertain test images.
Figures go to docs/birds_*.png; the tables replace the blocks between the markers in BENCHMARKS.md and docs/results.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from cub50 import mean_std
from markdown_block import write_block

from glassmetric.checkpoints import load_trained
from glassmetric.cli import main as cli_main
from glassmetric.config import load_config
from glassmetric.explain.correspondence import evaluate_correspondence
from glassmetric.explain.group_parts import evaluate_group_parts
from glassmetric.factory import eval_transform, make_splits
from glassmetric.retrieval.embed import embed_fields
from glassmetric.retrieval.metrics import retrieval_metrics
from glassmetric.retrieval.rerank import rerank_sweep
from glassmetric.retrieval.uncertainty import object_statistics, uncertainty_vs_failure, uncertainty_vs_ground_truth
from glassmetric.retriever.model import InferenceModel
from glassmetric.similarity.introspective import image_uncertainty
from glassmetric.similarity.ot_settings import OTSettings
from glassmetric.training.fit import fit

ROOT = Path(__file__).resolve().parents[1]
CUB50 = ROOT.parent / "shared" / "data" / "cub50"
DOCS = ROOT / "docs"
RESULTS = DOCS / "results.md"
#: each method's name in docs/results.md (its table is the ``birds-readme`` block)
LABELS = {
    "baseline": "baseline (MultiSimilarity)",
    "structural": "+ structural loss (`loss.similarity=structural`, 4x4)",
    "grouping": "+ attentive groups (`model.groups=4`)",
    "grouping-flatstart": "+ attentive groups, near-uniform start (`model.group_query_std=0.1`)",
    "grouping-flatstart+structural": "+ groups (near-uniform start) and structural loss (own 4x4 DIML head)",
    "introspective": "+ introspective (`loss.similarity=introspective`)",
    "grouping+structural": "+ groups and structural loss (own 4x4 DIML head)",
    "grouping+introspective": "+ groups and introspective",
}
METHODS = {
    "baseline": [],
    "structural": ["model.spatial_grid=4", "loss.similarity=structural"],
    "grouping": ["model.groups=4"],
    # the groups' queries start small: attention near average pooling, the pretrained geometry
    "grouping-flatstart": ["model.groups=4", "model.group_query_std=0.1"],
    "grouping-flatstart+structural": [
        "model.groups=4",
        "model.group_query_std=0.1",
        "model.spatial_grid=4",
        "model.spatial_head=own",
        "loss.similarity=structural",
    ],
    "introspective": ["model.uncertainty_dim=1280", "loss.similarity=introspective"],
    # the combinations the design allows: groups give the global embedding, a DIML head of its own the
    # local ones (a groups checkpoint has no global head to share) or an uncertainty head beside them
    "grouping+structural": [
        "model.groups=4",
        "model.spatial_grid=4",
        "model.spatial_head=own",
        "loss.similarity=structural",
    ],
    "grouping+introspective": ["model.groups=4", "model.uncertainty_dim=1280", "loss.similarity=introspective"],
}
GLOBAL_COLUMNS = ["recall@1", "recall@2", "recall@4", "recall@8", "nmi", "r_precision", "map_at_r"]


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / f"{method}-seed{seed}"


def train(method: str, seed: int, out: Path) -> Path:
    """The run's best checkpoint, training it unless a finished run is already there."""
    folder = run_dir(out, method, seed)
    best = folder / "checkpoints" / "best.ckpt"
    if (folder / "done").is_file() and best.is_file():
        return best
    overrides = [f"data.root={CUB50}", f"seed={seed}", f"trainer.output_dir={folder}", "trainer.progress_bar=false"]
    cfg = load_config("cub50", overrides + METHODS[method])
    print(f"training {method} seed {seed} -> {folder}", flush=True)
    result = fit(cfg, overwrite=True, run_test=False)
    (folder / "done").write_text(json.dumps({"epoch_seconds": result.epoch_seconds}))
    return Path(result.checkpoint)


def train_images_per_s(folder: Path) -> float:
    """Mean logged training throughput of a run (all its log versions)."""
    values = []
    for path in sorted((folder / "logs").glob("version_*/metrics.csv")):
        with open(path) as f:
            values += [
                float(r["perf/train_images_per_s"]) for r in csv.DictReader(f) if r.get("perf/train_images_per_s")
            ]
    return statistics.mean(values) if values else float("nan")


def trained_and_test(ckpt: Path):
    """``(model, cfg, test split)`` of a checkpoint, its data root pointed at the CUB-50 subset."""
    model, cfg = load_trained(str(ckpt), [f"data.root={CUB50}"])
    return model, cfg, make_splits(cfg, model).test


def cached(ckpt: Path, name: str, key, compute):
    """``compute()``, cached as ``name`` next to the checkpoint's run (recomputed when the
    checkpoint is newer or ``key``, the settings it depends on, differs)."""
    cache = ckpt.parents[1] / name
    if cache.is_file() and cache.stat().st_mtime >= ckpt.stat().st_mtime:
        stored = json.loads(cache.read_text())
        if stored.get("ks", stored.get("key")) == key:
            return stored["result"]
    result = compute()
    cache.write_text(json.dumps({"key": key, "result": result}, default=float))
    return result


def evaluate(ckpt: Path, ks: list[int]) -> dict:
    """:func:`evaluate_once`, cached next to the checkpoint."""
    return cached(ckpt, "bench_eval.json", ks, lambda: evaluate_once(ckpt, ks))


def correspondence(ckpt: Path, pairs: int) -> dict:
    """Keypoint transfer and part correspondence of ``pairs`` same-class test pairs (seed 0)."""
    model, cfg, test = trained_and_test(ckpt)
    ot = OTSettings.from_config(cfg)
    return evaluate_correspondence(
        model,
        test,
        pairs=pairs,
        grid=cfg.model.spatial_grid or 4,
        crop=224,
        resize=cfg.data.resize,
        seed=0,
        settings=ot,
        mean=model.backbone.mean,
        std=model.backbone.std,
        num_workers=cfg.data.num_workers,
    )


def group_parts(ckpt: Path) -> dict:
    """Group-to-part statistics of a grouping checkpoint on every test image."""
    model, cfg, test = trained_and_test(ckpt)
    return evaluate_group_parts(
        model,
        test,
        images=len(test),
        crop=224,
        resize=cfg.data.resize,
        seed=0,
        mean=model.backbone.mean,
        std=model.backbone.std,
        num_workers=cfg.data.num_workers,
    )


def evaluate_once(ckpt: Path, ks: list[int]) -> dict:
    """Global metrics, the re-ranking sweep and (introspective) the uncertainty report, from one embedding pass."""
    model, cfg, test = trained_and_test(ckpt)
    test.transform = eval_transform(cfg, model)
    model = InferenceModel(model, cfg.model.spatial_grid or 4)  # local cells, training-free without a spatial head
    local = model.has_local  # groups alone: no locals
    fields = ["embedding"] + (["local"] if local else []) + (["uncertainty"] if cfg.model.uncertainty_dim else [])
    start = time.perf_counter()
    emb = embed_fields(model, test, fields=fields, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers)
    out = {"embed_seconds": time.perf_counter() - start}
    out["global"] = retrieval_metrics(emb["embedding"], emb["labels"], seed=cfg.seed)
    if local:
        ot = OTSettings.from_config(cfg)
        sweep = rerank_sweep(
            query_global=emb["embedding"],
            query_local=emb["local"],
            query_labels=emb["labels"],
            ks=ks,
            epsilon=ot.epsilon,
            iters=ot.iters,
            tol=ot.tol,
            marginals=ot.marginals,
        )
        out["rerank"] = {str(k): v for k, v in sweep.items()}
    if "uncertainty" in emb:
        u = image_uncertainty(emb["uncertainty"])
        report = uncertainty_vs_failure(u, emb["embedding"], emb["labels"])
        out["uncertainty"] = report.summary()
        out["uncertainty"]["spearman"] = uncertainty_vs_ground_truth(report.uncertainty, object_statistics(test))
    return out


def pretrained_reference(out: Path) -> dict:
    """Test metrics of the ImageNet Lite0 features with no metric training (cached in ``out``)."""
    cache = out / "pretrained.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from cub50 import PooledFeatures, score

    from glassmetric.factory import build_model_from_config

    cfg = load_config("cub50", [f"data.root={CUB50}"])
    metrics = score(PooledFeatures(build_model_from_config(cfg).backbone), cfg)["metrics"]
    out.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(metrics))
    return metrics


def readme_table(results: dict, reference: dict, k: int = 10) -> str:
    """The summary of docs/results.md: global metrics and the re-ranked top ``k`` of every method."""
    lines = [
        f"| model (`cub50` preset) | seeds | R@1 | NMI | RP | MAP@R | re-ranked top {k}: R@1 | MAP@R |",
        "|---|---|---|---|---|---|---|---|",
        "| Lite0 ImageNet features, no metric training | - | "
        + " | ".join(f"{100 * reference[c]:.2f}" for c in ("recall@1", "nmi", "r_precision", "map_at_r"))
        + " | - | - |",
    ]
    for method, runs in results.items():
        cells = [mean_std([r["global"][c] for r in runs]) for c in ("recall@1", "nmi", "r_precision", "map_at_r")]
        if "rerank" in runs[0] and str(k) in runs[0]["rerank"]:
            cells += [mean_std([r["rerank"][str(k)][c] for r in runs]) for c in ("recall@1", "map_at_r")]
        else:
            cells += ["-", "-"]
        lines.append(f"| {LABELS.get(method, method)} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def accuracy_tables(results: dict, ks: list[int], speed: dict) -> str:
    lines = [
        "| model | seeds | R@1 | R@2 | R@4 | R@8 | NMI | RP | MAP@R | train time / epoch vs baseline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_speed = statistics.mean(speed["baseline"]) if speed.get("baseline") else float("nan")
    for method, runs in results.items():
        cells = [mean_std([r["global"][c] for r in runs]) for c in GLOBAL_COLUMNS]
        ratio = base_speed / statistics.mean(speed[method]) if speed.get(method) else float("nan")
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    lines += [
        "",
        "Structural re-ranking of each checkpoint's global top-K (K = 0: the global ranking):",
        "",
        "| model | " + " | ".join(f"K={k} R@1 / RP / MAP@R" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for method, runs in results.items():
        if "rerank" not in runs[0]:
            continue
        cells = [
            " / ".join(
                mean_std([r["rerank"][str(k)][c] for r in runs]) for c in ("recall@1", "r_precision", "map_at_r")
            )
            for k in ks
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def correspondence_section(name: str, corr: dict) -> str:
    plans = [
        ("learned plan (DIML, cross-correlation marginals)", "learned"),
        ("uniform marginals", "uniform_marginals"),
        ("uniform plan", "uniform"),
        ("nearest cell (arg-max S, no transport)", "nearest"),
        ("true target cell (the 4x4 grid's limit)", "oracle_cell"),
    ]
    lines = [
        f"**{name}**: {corr['n_pairs']} same-class test pairs, {corr['n_parts']} keypoints visible in both images, "
        f"{corr['grid']}x{corr['grid']} grid, PCK@{corr['pck_alpha']:g} of the larger side of the target's box.",
        "",
        "| plan | PCK@0.1 | mass share to the part's cell |",
        "|---|---|---|",
    ]
    for label, key in plans:
        share = f"{corr[key]:.3f}" if key in corr else "-"
        lines.append(f"| {label} | {corr[f'pck_{key}']:.3f} | {share} |")
    parts = list(corr["per_part_pck_learned"])
    lines += ["", "| part | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
    for label, key in (
        ("PCK learned", "per_part_pck_learned"),
        ("PCK nearest cell", "per_part_pck_nearest"),
        ("PCK true cell", "per_part_pck_oracle_cell"),
        ("share of SS", "part_mass"),
    ):
        lines.append(f"| {label} | " + " | ".join(f"{corr[key][p]:.3f}" for p in parts) + " |")
    return "\n".join(lines)


def part_mass_figure(masses: dict[str, dict[str, float]], n_cells: int, path: Path) -> None:
    from glassmetric.explain.figures import part_mass_figure as figure
    from glassmetric.explain.figures import save_figure

    title = "Which bird parts carry the structural similarity (CUB-50 test pairs, same class)"
    save_figure(figure(masses, n_cells, title=title), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 10, 50, 100])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_birds"))
    parser.add_argument("--accuracy-only", action="store_true", help="train and evaluate (cached per run), no figures")
    parser.add_argument("--reuse-only", action="store_true", help="evaluate the finished runs only, train nothing")
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave BENCHMARKS.md and docs/ alone")
    args = parser.parse_args()
    if not (CUB50 / "images.txt").is_file():
        raise SystemExit(f"bench/real_birds.py needs the CUB-50 subset at {CUB50}")
    torch.set_num_threads(os.cpu_count() or 1)
    out, started = Path(args.out), time.perf_counter()
    if args.reuse_only:  # the finished runs only: a partial table while training goes on elsewhere
        ckpts = {
            m: {
                s: run_dir(out, m, s) / "checkpoints" / "best.ckpt"
                for s in args.seeds
                if (run_dir(out, m, s) / "done").is_file()
            }
            for m in args.methods
        }
        ckpts = {m: c for m, c in ckpts.items() if c}
    else:
        ckpts = {m: {s: train(m, s, out) for s in args.seeds} for m in args.methods}

    results, speed = {}, {}
    for m in ckpts:
        for s, ckpt in ckpts[m].items():
            r = evaluate(ckpt, args.ks)
            print(json.dumps({"method": m, "seed": s, **r}, default=float), flush=True)
            results.setdefault(m, []).append(r)
            speed.setdefault(m, []).append(train_images_per_s(run_dir(out, m, s)))
    seeds = "; ".join(f"{m} {', '.join(map(str, c))}" for m, c in ckpts.items())
    sections = [
        f"Measured by `python bench/real_birds.py {' '.join(sys.argv[1:])}`".rstrip()
        + f" on {os.cpu_count()} CPU cores, torch {torch.__version__}. Percentages; mean ± std over the seeds "
        f"({seeds}).",
        "",
        accuracy_tables(results, args.ks, speed),
    ]

    if args.accuracy_only:
        print("\n" + "\n".join(sections) + "\n\n" + readme_table(results, pretrained_reference(out)))
        return
    seed0 = args.seeds[0]
    first = {m: c.get(seed0, next(iter(c.values()))) for m, c in ckpts.items()}  # the figures' checkpoint
    figures = DOCS if not args.no_write else out / "figures"
    masses = {}
    for m in ("baseline", "structural"):
        if m not in ckpts:
            continue
        corr = cached(
            first[m], "bench_correspondence.json", args.pairs, lambda m=m: correspondence(first[m], args.pairs)
        )
        print(json.dumps({"correspondence": m, **corr}, default=float), flush=True)
        label = "baseline checkpoint, training-free" if m == "baseline" else "structurally trained checkpoint"
        sections += ["", correspondence_section(f"{label} ({first[m].parents[1].name})", corr)]
        masses[label] = corr["part_mass"]
        n_cells = corr["n_cells"]
    if masses:
        part_mass_figure(masses, n_cells, figures / "birds_part_mass.png")

    test_dir = CUB50 / "images"
    if "baseline" in ckpts or "structural" in ckpts:
        ck = first.get("structural", first.get("baseline"))
        a = test_dir / "036.Northern_Flicker" / sorted(os.listdir(test_dir / "036.Northern_Flicker"))[0]
        b = test_dir / "036.Northern_Flicker" / sorted(os.listdir(test_dir / "036.Northern_Flicker"))[1]
        cli_main(["explain", str(a), str(b), "--checkpoint", str(ck), "-o", str(figures / "birds_pair.png")])

    grouped = [m for m in ckpts if m.startswith("grouping")]
    if grouped:
        sections += [
            "",
            "**Attention groups** (4 groups, all test images): most frequent nearest part of each "
            "group's attention peak (share of images), how often the peak sits at the group's most frequent "
            "position, how many of the 49 positions the group attends to (the perplexity of its attention, "
            "mean over images: 1 is one position, 49 average pooling), and the mutual information between "
            "group and part, against i.i.d. random maps on the same images.",
            "",
            "| model | seed | group 1 | group 2 | group 3 | group 4 | distinct parts | MI (nats) | MI random maps | top-10% IoU (chance) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m in grouped:  # every seed of the groups alone, the first seed of each combination
            for s, ckpt in list(ckpts[m].items())[: None if m == "grouping" else 1]:
                g = cached(ckpt, "bench_groups.json", "all, spread", lambda ckpt=ckpt: group_parts(ckpt))
                print(json.dumps({"method": m, "seed": s, **g}, default=float), flush=True)
                cells = [
                    f"{v['part']} {100 * v['share']:.0f}% (fixed {100 * v['fixed_position']:.0f}%, "
                    f"{v['spread']:.1f} pos.)"
                    for v in g["groups"].values()
                ]
                sections.append(
                    f"| {m} | {s} | " + " | ".join(cells) + f" | {g['distinct_parts']} | {g['mi']:.3f} | "
                    f"{g['mi_random']:.3f} | {g['iou']:.3f} ({g['iou_chance']:.3f}) |"
                )
    if "grouping" in ckpts:
        cli_main(
            [
                "eval",
                "--checkpoint",
                str(first["grouping"]),
                "--groups-parts",
                "500",
                "--groups-figure",
                str(figures / "birds_groups.png"),
                f"data.root={CUB50}",
            ]
        )

    uncertain = [m for m in results if "uncertainty" in results[m][0]]
    if uncertain:
        sections += [
            "",
            "**Uncertainty** (introspective checkpoints, test images as queries): AUROC of ||u|| for an R@1 "
            "failure; R@1 of the certain and uncertain halves; Spearman rho with the box's share of the image "
            "and with the number of visible parts.",
            "",
            "| model | seed | AUROC | R@1 certain half | R@1 uncertain half | rho(box area share) | rho(visible parts) |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in uncertain:
            for s, r in zip(ckpts[m], results[m], strict=True):
                u = r["uncertainty"]
                sp = u["spearman"]
                sections.append(
                    f"| {m} | {s} | {u['auroc_uncertainty_vs_r1_failure']:.3f} | {100 * u['recall@1_certain_half']:.2f} | "
                    f"{100 * u['recall@1_uncertain_half']:.2f} | {sp['box_area_share']['rho']:+.3f} "
                    f"(p {sp['box_area_share']['p']:.2g}) | {sp['visible_parts']['rho']:+.3f} (p {sp['visible_parts']['p']:.2g}) |"
                )
    if "introspective" in ckpts:
        cli_main(
            [
                "eval",
                "--checkpoint",
                str(first["introspective"]),
                "--uncertainty-figure",
                str(figures / "birds_uncertainty.png"),
                f"data.root={CUB50}",
            ]
        )

    sections += [
        "",
        f"Total {(time.perf_counter() - started) / 60:.0f} min (training reused where a finished run was found).",
    ]
    text = "\n".join(sections)
    print("\n" + text)
    summary = readme_table(results, pretrained_reference(out))
    print("\n" + summary)
    if not args.no_write:
        write_block(
            "birds", text, "CUB-50 real birds: each method's gain and its explanations (`python bench/real_birds.py`)"
        )
        write_block("birds-readme", summary, "Each method measured", path=RESULTS)


if __name__ == "__main__":
    main()
