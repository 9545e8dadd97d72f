"""The study: every method on a real domain, trained until validation MAP@R stops rising, over
several seeds, each compared with the baseline of the same seed.

    GLASSMETRIC_DATA_ROOT=/path/to/data python bench/study.py --domain birds|cars
        [--seeds 0 1 2 3 4] [--methods imagenet baseline ...] [--epochs 30] [--cache-features V]
        [--rerank-k 10] [--pairs 1000] [--set KEY=VALUE ...] [--out DIR] [--dry-run] [--no-write]

Domains: ``birds``, the ``cub75`` preset (75 training species: CUB-200-2011 1-25 and CUB-200-2010
51-100; test CUB-200-2011 26-50, with part keypoints); ``cars``, the ``cars98`` preset (Stanford
Cars 1-49 train, 50-98 test, no keypoints); ``demo``, the embedded synthetic data (a smoke run).
``GLASSMETRIC_DATA_ROOT`` defaults to ../shared/data beside the project.

One command per domain, resumable: every run lives in ``<out>/<method>-seed<s>`` (``--out``
defaults to runs/study/<domain>); a finished run (its ``done`` file) trained for at least
``--epochs`` is reused, a shorter or interrupted one is resumed from its ``last.ckpt`` (so
raising ``--epochs`` extends the finished runs), and each evaluation is cached next to its
checkpoint. A run folder does not record the options it was trained with: delete it (or pick
another ``--out``) to retrain with other ones. Every run selects its epoch by
validation MAP@R on the validation classes; ``--cache-features V`` trains on V cached views of
the frozen stages (``trainer.cache_features``). ``--dry-run`` lists the runs and their estimated
cost and trains nothing.

Outputs: the tables (printed, and written between the ``study-<domain>`` markers of
docs/results.md), ``docs/study_<domain>_curves.png`` (validation MAP@R and R@1 per epoch, mean
over seeds), ``docs/study_<domain>_risk_coverage.png`` (introspective models) and
``<out>/study.json`` (every per-seed number behind the tables).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from markdown_block import write_block
from study_report import curves_figure, render, risk_coverage_figure
from study_stats import validation_curve

from glassmetric.checkpoints import load_trained
from glassmetric.config import Config, load_config
from glassmetric.explain.correspondence import evaluate_correspondence
from glassmetric.explain.group_sharpness import group_sharpness
from glassmetric.factory import build_model_from_config, eval_transform, make_splits
from glassmetric.retrieval.confidence import compare_confidences, confidence_scores, kept_recall
from glassmetric.retrieval.embed import embed_fields
from glassmetric.retrieval.metrics import retrieval_metrics
from glassmetric.retrieval.rerank import rerank_sweep
from glassmetric.retriever.model import InferenceModel
from glassmetric.similarity.ot_settings import OTSettings
from glassmetric.training.fit import fit

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = DOCS / "results.md"


@dataclass(frozen=True)
class Domain:
    preset: str
    title: str
    keypoints: bool  # the test images have part keypoints (keypoint-transfer PCK)
    epochs: int  # default schedule
    untrained: str = "ImageNet features, no metric training"  # the preset's model before training


DOMAINS = {
    "birds": Domain("cub75", "birds: 75 training species, CUB-200-2011 classes 26-50 as test", True, 30),
    "cars": Domain("cars98", "cars: Stanford Cars classes 1-49 train, 50-98 test", False, 30),
    "demo": Domain("demo_scratch", "embedded synthetic data", True, 8, "random initialisation, no metric training"),
}
#: the trained methods: config overrides over the domain's preset ({dim}: the preset's embedding size)
METHODS: dict[str, list[str]] = {
    "baseline": [],
    "proxyanchor": ["loss.name=proxyanchor"],
    "structural": ["model.spatial_grid=4", "loss.similarity=structural"],
    "grouping": ["model.groups=4"],
    # the groups' queries start small: attention near average pooling, the pretrained geometry
    "grouping-flatstart": ["model.groups=4", "model.group_query_std=0.1"],
    "introspective": ["model.uncertainty_dim={dim}", "loss.similarity=introspective"],
    # the combinations the design allows: groups give the global embedding and a DIML head of its
    # own the local cells (a groups model has no global head to share), or an uncertainty head
    "grouping-flatstart+structural": [
        "model.groups=4",
        "model.group_query_std=0.1",
        "model.spatial_grid=4",
        "model.spatial_head=own",
        "loss.similarity=structural",
    ],
    "grouping-flatstart+introspective": [
        "model.groups=4",
        "model.group_query_std=0.1",
        "model.uncertainty_dim={dim}",
        "loss.similarity=introspective",
    ],
}
#: ``imagenet``: the preset's untrained model (ImageNet features through the identity head)
ALL_METHODS = ["imagenet", *METHODS]
#: trained methods whose checkpoint is also scored after structural re-ranking of its top K
RERANKED = ("baseline", "structural", "grouping-flatstart+structural")
#: training images/s of the baseline on 2 CPU cores (cub50 preset, uncached), and each method's
#: step cost relative to it: the dry run's estimate until a finished run of the method says better
BASELINE_IMAGES_PER_S = 25.0
RELATIVE_COST = {"structural": 1.2, "introspective": 1.1, "proxyanchor": 1.0}
EMBED_IMAGES_PER_S = 30.0


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / f"{method}-seed{seed}"


def run_config(domain: Domain, method: str, seed: int, args, folder: Path) -> Config:
    """The config of one run: the preset, the method, the schedule and ``--set``."""
    dim = load_config(domain.preset, args.set).model.embedding_dim
    overrides = [o.format(dim=dim) for o in METHODS[method]]
    overrides += [f"seed={seed}", f"trainer.output_dir={folder}", "trainer.progress_bar=false"]
    overrides.append(f"trainer.max_epochs={args.epochs}")
    if args.cache_features:
        overrides.append(f"trainer.cache_features={args.cache_features}")
        overrides.append(f"trainer.cache_dir={folder.parent / 'feature_caches'}")  # one per seed, for every method
    return load_config(domain.preset, overrides + list(args.set))


def run_state(folder: Path, epochs: int) -> str:
    """``done`` (finished with at least ``epochs`` epochs), ``resume`` (a last.ckpt to go on from) or ``new``."""
    done = folder / "done"
    finished = done.is_file() and (folder / "checkpoints" / "best.ckpt").is_file()
    if finished and json.loads(done.read_text()).get("epochs", 0) >= epochs:
        return "done"
    return "resume" if (folder / "checkpoints" / "last.ckpt").is_file() else "new"


def train(domain: Domain, method: str, seed: int, args, out: Path) -> Path:
    """The run's selected checkpoint, training (or resuming) it unless it is finished."""
    folder = run_dir(out, method, seed)
    best = folder / "checkpoints" / "best.ckpt"
    state = run_state(folder, args.epochs)
    if state == "done":
        return best
    cfg = run_config(domain, method, seed, args, folder)
    print(f"training {method} seed {seed} ({state}, {args.epochs} epochs) -> {folder}", flush=True)
    result = fit(cfg, resume=state == "resume", overwrite=state == "new", run_test=False)
    (folder / "done").write_text(json.dumps({"epochs": args.epochs}))
    return Path(result.checkpoint)


def cached(folder: Path, name: str, key, compute, newer_than: Path | None = None):
    """``compute()``, cached as ``folder/name`` (recomputed when ``key`` differs or ``newer_than`` is newer)."""
    cache = folder / name
    if cache.is_file() and (newer_than is None or cache.stat().st_mtime >= newer_than.stat().st_mtime):
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            return stored["result"]
    result = compute()
    folder.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "result": result}, default=float))
    return result


def evaluate(model: torch.nn.Module, cfg: Config, rerank_k: int | None) -> dict:
    """One embedding pass over the test split: global metrics; structural re-ranking of the top
    ``rerank_k`` (None: not); the confidence comparison (uncertainty head); group sharpness (groups)."""
    test = make_splits(cfg, model).test
    test.transform = eval_transform(cfg, model)
    view = InferenceModel(model, cfg.model.spatial_grid or 4)
    fields = ["embedding"]
    fields += ["local"] if rerank_k is not None and view.has_local else []
    fields += [f for f in ("uncertainty", "attention") if f in view.fields]
    emb = embed_fields(view, test, fields=fields, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers)
    out: dict = {"global": retrieval_metrics(emb["embedding"], emb["labels"], seed=cfg.seed)}
    if "local" in emb:
        ot = OTSettings.from_config(cfg)
        sweep = rerank_sweep(
            query_global=emb["embedding"],
            query_local=emb["local"],
            query_labels=emb["labels"],
            ks=[rerank_k],
            epsilon=ot.epsilon,
            iters=ot.iters,
            tol=ot.tol,
            marginals=ot.marginals,
        )
        out["rerank"] = sweep[rerank_k]
    if "uncertainty" in emb:
        scores, hit = confidence_scores(emb["embedding"], emb["labels"], uncertainty=emb["uncertainty"])
        out["confidence"] = compare_confidences(scores, hit)
        grid = np.linspace(0, 1, 51)[1:]
        out["kept_recall"] = {
            name: np.interp(grid, np.arange(1, len(hit) + 1) / len(hit), kept_recall(s, hit)).tolist()
            for name, s in {**scores, "oracle": hit.astype(float)}.items()
        }
    if "attention" in emb:
        out["sharpness"] = group_sharpness(emb["attention"])
    return out


def correspondence(model: torch.nn.Module, cfg: Config, pairs: int) -> float:
    """Keypoint-transfer PCK@0.1 of the model's plan (training-free cells without a spatial head)
    on ``pairs`` same-class test pairs (seed 0: the same pairs for every model)."""
    test = make_splits(cfg, model).test
    ot = OTSettings.from_config(cfg)
    crop = cfg.data.eval_image_size or cfg.data.image_size
    result = evaluate_correspondence(
        model,
        test,
        pairs=pairs,
        grid=cfg.model.spatial_grid or 4,
        crop=crop,
        resize=cfg.data.resize,
        seed=0,
        settings=ot,
        mean=model.backbone.mean,
        std=model.backbone.std,
        num_workers=cfg.data.num_workers,
    )
    return float(result["pck_learned"])


def train_images_per_s(folder: Path) -> float:
    """Mean logged training throughput of a run (all its log versions)."""
    values = []
    for path in sorted(folder.glob("logs/version_*/metrics.csv")):
        with open(path) as f:
            values += [
                float(r["perf/train_images_per_s"]) for r in csv.DictReader(f) if r.get("perf/train_images_per_s")
            ]
    return statistics.mean(values) if values else math.nan


def dry_run(domain: Domain, methods: list[str], args, out: Path) -> str:
    """The runs the command would do, each with its state and estimated hours."""
    cfg = load_config(domain.preset, list(args.set))
    splits = make_splits(cfg, build_model_from_config(cfg))
    n_train, n_val, n_test = (len(s) if s is not None else 0 for s in (splits.train, splits.val, splits.test))
    measured = {
        m: [v for s in args.seeds if not math.isnan(v := train_images_per_s(run_dir(out, m, s)))] for m in METHODS
    }
    base = statistics.mean(measured["baseline"]) if measured["baseline"] else BASELINE_IMAGES_PER_S
    lines = [
        f"{domain.title}: {n_train} training, {n_val} validation, {n_test} test images; "
        f"{args.epochs} epochs, seeds {' '.join(map(str, args.seeds))}, runs under {out}",
        "| method | seed | state | epochs to train | train img/s (estimate) | hours |",
        "|---|---|---|---|---|---|",
    ]
    total = 0.0
    for m in methods:
        if m == "imagenet":
            hours = n_test / EMBED_IMAGES_PER_S / 3600
            lines.append(f"| imagenet | - | evaluate only | 0 | - | {hours:.2f} |")
            total += hours
            continue
        ips = statistics.mean(measured[m]) if measured[m] else base / RELATIVE_COST.get(m.split("+")[-1], 1.15)
        for s in args.seeds:
            folder = run_dir(out, m, s)
            state = run_state(folder, args.epochs)
            done = 0
            if state == "resume":
                done = len(validation_curve(folder)["map_at_r"])
            todo = 0 if state == "done" else max(args.epochs - done, 0)
            seconds = todo * (n_train / ips + n_val / EMBED_IMAGES_PER_S) + n_test / EMBED_IMAGES_PER_S
            total += seconds / 3600
            lines.append(f"| {m} | {s} | {state} | {todo} | {ips:.0f} | {seconds / 3600:.2f} |")
    lines.append(
        f"\nEstimated total: {total:.1f} hours on this machine, from the training throughput of the finished "
        f"runs where there are any, else {BASELINE_IMAGES_PER_S:g} img/s for an uncached baseline on 2 CPU cores"
        + (
            " (the speed-up of trainer.cache_features is only in the estimate once finished runs measured it)."
            if args.cache_features
            else "."
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", choices=list(DOMAINS), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS)
    parser.add_argument("--epochs", type=int, help="trainer.max_epochs of every run (default: 30; demo 8)")
    parser.add_argument(
        "--cache-features", type=int, metavar="V", help="train on V cached views (trainer.cache_features)"
    )
    parser.add_argument("--rerank-k", type=int, default=10, help="structural re-ranking of the global top K")
    parser.add_argument("--pairs", type=int, default=1000, help="same-class test pairs of the keypoint transfer")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides of every run")
    parser.add_argument("--out", help="the runs' folder (default runs/study/<domain>)")
    parser.add_argument("--figures", help="folder of the figures (default docs/, or <out> with --no-write)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their estimated cost, train nothing")
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave docs/ alone")
    args = parser.parse_args(argv)
    os.environ.setdefault("GLASSMETRIC_DATA_ROOT", str(ROOT.parent / "shared" / "data"))
    domain = DOMAINS[args.domain]
    args.epochs = args.epochs or domain.epochs
    out = Path(args.out) if args.out else ROOT / "runs" / "study" / args.domain
    methods = [m for m in ALL_METHODS if m in args.methods]
    if "baseline" not in methods and set(methods) != {"imagenet"}:
        methods.insert(1 if "imagenet" in methods else 0, "baseline")  # every difference is to the baseline
    if args.dry_run:
        text = dry_run(domain, methods, args, out)
        print(text)
        return {"dry_run": text}
    started = time.perf_counter()

    runs: dict[str, dict[int, dict]] = {}
    if "imagenet" in methods:
        cfg = load_config(domain.preset, list(args.set))
        result = cached(
            out / "imagenet",
            "study_eval.json",
            {"k": None, "set": args.set},
            lambda: evaluate(build_model_from_config(cfg), cfg, None),
        )
        runs["imagenet"] = dict.fromkeys(args.seeds, result)  # no training: the same row pairs with every seed
    for m in [m for m in methods if m != "imagenet"]:
        for s in args.seeds:
            ckpt = train(domain, m, s, args, out)
            folder = run_dir(out, m, s)
            k = args.rerank_k if m in RERANKED else None

            def evaluate_run(ckpt: Path = ckpt, k: int | None = k) -> dict:
                model, cfg = load_trained(str(ckpt))
                return evaluate(model, cfg, k)

            r = cached(folder, "study_eval.json", {"k": k}, evaluate_run, newer_than=ckpt)
            r["curve"] = validation_curve(folder)
            r["train_images_per_s"] = train_images_per_s(folder)
            if domain.keypoints and m in ("baseline", "structural") and args.pairs:

                def pck(ckpt: Path = ckpt) -> float:
                    model, cfg = load_trained(str(ckpt))
                    return correspondence(model, cfg, args.pairs)

                r["pck"] = cached(folder, "study_pck.json", {"pairs": args.pairs}, pck, newer_than=ckpt)
            runs.setdefault(m, {})[s] = r
            print(json.dumps({"method": m, "seed": s, "global": r["global"], "rerank": r.get("rerank")}), flush=True)

    command = " ".join(["python bench/study.py", *(argv if argv is not None else sys.argv[1:])])
    machine = f"{os.cpu_count()} CPU cores (shared with other jobs), torch {torch.__version__}"
    figures = Path(args.figures) if args.figures else (out if args.no_write else DOCS)
    drawn = []
    if any(m != "imagenet" for m in runs):
        drawn.append(curves_figure(runs, domain, figures / f"study_{args.domain}_curves.png"))
    if any("kept_recall" in r for by_seed in runs.values() for r in by_seed.values()):
        drawn.append(risk_coverage_figure(runs, domain, figures / f"study_{args.domain}_risk_coverage.png"))
    minutes = (time.perf_counter() - started) / 60
    text = render(domain, runs, args, command, machine, minutes, [p.name for p in drawn])
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(
        json.dumps({m: {str(s): r for s, r in by.items()} for m, by in runs.items()}, default=float)
    )
    if not args.no_write:
        write_block(f"study-{args.domain}", text, f"The study: {domain.title}", path=RESULTS)
    return {"runs": runs, "text": text}


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
