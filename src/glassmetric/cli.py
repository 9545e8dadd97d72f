"""Command line: ``glassmetric fit | eval | embed | explain | report | serve | export | presets``.

Each verb is a thin wrapper over :class:`glassmetric.Retriever` (inference) or
:func:`glassmetric.training.fit.fit` (training).

Every error the user can fix (a bad config key, a missing file, a truncated checkpoint) ends
in one line on stderr naming the culprit, and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from glassmetric.errors import ConfigError, GlassmetricError
from glassmetric.outputs import atomic_write_text, figure_file, writable_file, writable_folder


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (``glassmetric eval: error: argument --k: ...``),
    like every other error, instead of the usage text and the error; it points at the help of
    the verb at fault (``glassmetric eval --help``)."""

    #: the parser of each verb (``fit``, ``eval``, ...), on the top-level parser
    verbs: dict[str, argparse.ArgumentParser]

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_VERBOSE_HELP = "show the libraries' warnings and messages (faiss, Lightning), which are hidden otherwise"


def _parser() -> _Parser:
    from glassmetric import __version__

    parser = _Parser(prog="glassmetric", description="Interpretable deep metric learning.")
    parser.add_argument("--version", action="version", version=f"glassmetric {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="train a model from a preset or YAML config")
    fit.add_argument("--config", default="demo", help="preset name (see `glassmetric presets`) or YAML file")
    fit.add_argument("--resume", action="store_true", help="continue from trainer.output_dir/checkpoints/last.ckpt")
    fit.add_argument(
        "--overwrite",
        action="store_true",
        help="start again: first remove the files an earlier run wrote in "
        "output_dir (checkpoints, logs, config.yaml, metrics.json); other files stay",
    )
    fit.add_argument("--baseline", action="store_true", help="also evaluate the untrained model and print both")
    fit.add_argument("--no-test", action="store_true", help="skip the test evaluation at the end")
    fit.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.max_epochs=5")

    ev = sub.add_parser("eval", help="evaluate a checkpoint on its test split, or on a query/gallery pair")
    ev.add_argument("--checkpoint", required=True, help="a .ckpt written by `glassmetric fit`")
    ev.add_argument(
        "--data",
        help="image folder (one sub-folder per class) searched against itself, each query left "
        "out of its own results (default: the checkpoint's --split)",
    )
    ev.add_argument("--split", choices=("test", "val", "train"), default="test")
    ev.add_argument(
        "--query",
        help="query image folder (one sub-folder per class); needs --gallery (the same folder "
        "as --gallery is searched against itself, as with --data)",
    )
    ev.add_argument("--gallery", help="gallery image folder; classes matched to --query by folder name")
    ev.add_argument(
        "--knn",
        choices=("auto", "torch", "faiss", "index"),
        help="kNN backend (default: the config's, "
        "eval.knn_backend: auto, exact torch or faiss by size and device); index: "
        "the faiss gallery index of eval.index (exact below eval.index.exact_below images, HNSW / IVF above)",
    )
    ev.add_argument(
        "--index-dir",
        metavar="DIR",
        help="gallery index cache: read it from DIR when it holds the index of "
        "these embeddings, else build it and save it there (implies --knn index)",
    )
    ev.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    ev.add_argument("--rerank", choices=("structural",), help="re-rank each query's global top-K by s_global + SS")
    ev.add_argument("--k", default="100", help="shortlist size(s) K for --rerank; a list sweeps K, e.g. 0,5,10,50,100")
    ev.add_argument(
        "--correspondence",
        type=int,
        metavar="PAIRS",
        help="also score the part correspondence of the "
        "transport plan on PAIRS same-class pairs (data with part keypoints)",
    )
    ev.add_argument(
        "--uncertainty",
        action="store_true",
        help="relate each query's uncertainty (models with an "
        "uncertainty head) to its R@1 failure: AUROC, R@1 of the certain and uncertain halves",
    )
    ev.add_argument(
        "--uncertainty-csv", metavar="CSV", help="write every query's uncertainty and R@1 hit (implies --uncertainty)"
    )
    ev.add_argument(
        "--uncertainty-figure",
        metavar="PNG",
        help="draw the 12 most and 12 least uncertain queries (implies --uncertainty)",
    )
    ev.add_argument(
        "--groups-parts",
        type=int,
        metavar="IMAGES",
        help="also measure how distinct the attention "
        "groups are on IMAGES images (model.groups checkpoints, data with part keypoints): top-region IoU "
        "between groups and the ground-truth part nearest each group's attention peak",
    )
    ev.add_argument(
        "--groups-figure",
        metavar="PNG",
        help="draw each attention group's map on 12 images of the "
        "split (model.groups checkpoints; with --groups-parts, columns named by each group's part)",
    )
    ev.add_argument(
        "--groups-fraction",
        type=float,
        default=0.1,
        help="share of the positions in a group's top attention region for --groups-parts (default 0.1)",
    )
    ev.add_argument("--out", help="write the metrics as JSON to this file (missing folders are created)")
    ev.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=/data/CUB_200_2011"
    )

    ex = sub.add_parser(
        "explain",
        help="explain why two images were judged alike (structural matching, or per-group attention for model.groups)",
    )
    ex.add_argument("image_x", help="first image (the query)")
    ex.add_argument("image_y", help="second image (the candidate)")
    ex.add_argument("--checkpoint", required=True, help="a .ckpt written by `glassmetric fit`")
    ex.add_argument("-o", "--output", default="pair.png", help="figure file (.png, .svg, .pdf, .jpg, ...)")
    ex.add_argument(
        "--top-flows", type=int, default=64, help="most flows drawn (the strongest, until they carry half of SS)"
    )

    rp = sub.add_parser("report", help="write a static HTML retrieval report with explanations (opens offline)")
    rp.add_argument("--checkpoint", required=True, help="a .ckpt written by `glassmetric fit`")
    rp.add_argument(
        "--data",
        help="image folder (one sub-folder per class) searched against itself (default: the checkpoint's --split)",
    )
    rp.add_argument("--split", choices=("test", "val", "train"), default="test")
    rp.add_argument("--query", help="query image folder; needs --gallery (classes matched by folder name)")
    rp.add_argument("--gallery", help="gallery image folder")
    rp.add_argument("-o", "--output", default="report", help="folder for index.html and its images")
    rp.add_argument("--queries", type=int, default=4, help="queries shown per group: worst, random, best (default 4)")
    rp.add_argument("--top", type=int, default=10, help="results shown per query (default 10)")
    rp.add_argument("--k", default="0,5,10,50,100", help="shortlist sizes of the re-ranking K-sweep")
    rp.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    rp.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=/data/CUB_200_2011"
    )

    sv = sub.add_parser(
        "serve", help="a local web explorer: search a gallery by upload or pick, see each result's explanation"
    )
    sv.add_argument("--checkpoint", required=True, help="a .ckpt written by `glassmetric fit`")
    sv.add_argument(
        "--gallery",
        help="gallery image folder (one sub-folder per class, or just images); default: the checkpoint's --split",
    )
    sv.add_argument("--split", choices=("test", "val", "train"), default="test")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--cache-dir", help="where gallery embeddings are cached (default ~/.cache/glassmetric/gallery)")
    sv.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    sv.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload in MiB (default 10)")
    sv.add_argument(
        "--max-megapixels", type=float, default=25.0, help="largest uploaded image in megapixels (default 25)"
    )
    sv.add_argument("--max-in-flight", type=int, default=32, help="requests served at once; more get 503 (default 32)")
    sv.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds a request's body may take to arrive; slower ones get 408 (default 30)",
    )
    sv.add_argument("--workers", type=int, default=1, help="threads doing model work (default 1)")
    sv.add_argument(
        "--upload-store-mb",
        type=float,
        default=64.0,
        help="memory for the recent uploads kept to be "
        "explained later, their embeddings and model views, in MiB (default 64)",
    )
    sv.add_argument(
        "--knn",
        choices=("exact", "index"),
        default="exact",
        help="gallery search: exact kNN (default) or a "
        "faiss index (exact below 50k images, HNSW below 2M, IVF above; eval.index.* overrides shape it)",
    )
    sv.add_argument(
        "--index-dir",
        metavar="DIR",
        help="gallery index cache: read it from DIR when it fits the gallery, "
        "else build it and save it there (implies --knn index)",
    )
    sv.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.index.kind=hnsw")

    exp = sub.add_parser(
        "export",
        help="export a checkpoint's embedding model to ONNX (all its heads' outputs) or as weights only "
        "(safetensors with its config, for Retriever.from_checkpoint)",
    )
    exp.add_argument("--checkpoint", required=True, help="a .ckpt written by `glassmetric fit`")
    exp.add_argument(
        "--format",
        choices=("onnx", "weights"),
        default="onnx",
        help="onnx: an ONNX graph with its preprocessing in the metadata; weights: the model's weights "
        "and config as safetensors, no optimizer state (default onnx)",
    )
    exp.add_argument("-o", "--output", help="file to write (default model.onnx, or model.safetensors for weights)")
    exp.add_argument("--image-size", type=int, help="input height = width (default: the config's evaluation size)")
    exp.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs torch comparison")

    em = sub.add_parser(
        "embed", help="write a folder's embeddings (every one the model gives), labels and paths to .npz"
    )
    em.add_argument("--checkpoint", required=True, help="a .ckpt written by `glassmetric fit`")
    em.add_argument("--data", required=True, help="image folder: one sub-folder per class, or just images (label 0)")
    em.add_argument("-o", "--output", default="embeddings.npz", help="the .npz file to write")
    em.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    em.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.on_bad_image=skip")

    sub.add_parser("presets", help="list the shipped configuration presets")
    for verb in sub.choices.values():  # --verbose after the verb too; SUPPRESS keeps one given before it
        verb.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)
    parser.verbs = dict(sub.choices)
    return parser


def _cmd_fit(args: argparse.Namespace) -> int:
    from glassmetric.config import load_config
    from glassmetric.retrieval.metrics import format_metrics_table
    from glassmetric.training.fit import fit

    cfg = load_config(args.config, args.overrides)
    result = fit(
        cfg,
        resume=args.resume,
        overwrite=args.overwrite,
        baseline=args.baseline,
        run_test=not args.no_test,
        source=args.config,
        progress=True,
    )
    if result.test_metrics:
        rows = {}
        if result.baseline_metrics is not None:
            rows["untrained"] = result.baseline_metrics
        rows["trained"] = result.test_metrics
        print(f"\ntest split of {cfg.data.name} ({result.checkpoint}):")
        print(format_metrics_table(rows))
        print(f"metrics written to {result.output_dir / 'metrics.json'}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from glassmetric.retriever import Retriever

    _check_eval_args(args)
    retriever = Retriever.from_checkpoint(args.checkpoint, args.device, args.overrides)
    name, dataset, gallery = retriever.eval_data(
        split=args.split, query=args.query, gallery=args.gallery, folder=args.data
    )
    report: dict = {"checkpoint": args.checkpoint, "data": name}
    for wanted, analysis in _EVAL_ANALYSES:
        if wanted(args):
            analysis(args, retriever, name, dataset, gallery, report)
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2, default=float))
        print(f"metrics written to {args.out}")
    return 0


def _check_eval_args(args: argparse.Namespace) -> None:
    """Every eval argument and output file checked before any work."""
    if not 0 < args.groups_fraction <= 1:
        raise ConfigError(f"--groups-fraction: expected a share in (0, 1], got {args.groups_fraction}")
    if args.groups_parts is not None and args.groups_parts < 1:
        raise ConfigError(f"--groups-parts: expected a number of images >= 1, got {args.groups_parts}")
    if args.correspondence is not None and args.correspondence < 1:
        raise ConfigError(f"--correspondence: expected a number of pairs >= 1, got {args.correspondence}")
    if args.rerank:
        _parse_ks(args.k)
    _check_eval_outputs(args)


def _eval_metrics(args, retriever, name, dataset, gallery, report: dict) -> None:
    """The retrieval metrics, or with --rerank the K-sweep of structural re-ranking."""
    from glassmetric.retrieval.metrics import format_metrics_table

    knn = "index" if args.index_dir else args.knn
    if args.rerank:
        ks = _parse_ks(args.k)
        sweep = retriever.evaluate(
            dataset, gallery, rerank_ks=ks, knn_backend=knn, index_dir=args.index_dir, progress=True
        )
        print(f"{name} ({args.checkpoint}), structural re-ranking of the global top-K:")
        print(format_metrics_table({f"K={k}" if k else "K=0 (global)": m for k, m in sweep.items()}))
        report["rerank"] = {str(k): m for k, m in sweep.items()}
        report["metrics"] = sweep[max(ks)]
    else:
        report["metrics"] = retriever.evaluate(
            dataset, gallery, knn_backend=knn, index_dir=args.index_dir, progress=True
        )
        print(f"{name} ({args.checkpoint}):")
        print(format_metrics_table({Path(args.checkpoint).name: report["metrics"]}))


def _eval_correspondence(args, retriever, name, dataset, gallery, report: dict) -> None:
    from glassmetric.explain.correspondence import evaluate_correspondence

    cfg, ot, model = retriever.cfg, retriever.settings, retriever.model
    corr = evaluate_correspondence(
        model,
        dataset,
        pairs=args.correspondence,
        grid=cfg.model.spatial_grid or 4,
        crop=cfg.data.eval_image_size or cfg.data.image_size,
        resize=cfg.data.resize,
        seed=cfg.seed,
        device=retriever.device,
        settings=ot,
        mean=model.backbone.mean,
        std=model.backbone.std,
        num_workers=cfg.data.num_workers,
    )
    print(
        f"part correspondence over {corr['n_pairs']} same-class pairs ({corr['n_parts']} parts): "
        f"learned plan {corr['learned']:.3f}, uniform marginals {corr['uniform_marginals']:.3f}, "
        f"uniform plan {corr['uniform']:.3f} (best possible {corr['upper_bound']:.3f})"
    )
    if "pck_learned" in corr:
        print(
            f"keypoint transfer PCK@{corr['pck_alpha']:g}: learned plan {corr['pck_learned']:.3f}, uniform "
            f"marginals {corr['pck_uniform_marginals']:.3f}, uniform plan {corr['pck_uniform']:.3f}, nearest cell "
            f"{corr['pck_nearest']:.3f}, true target cell {corr['pck_oracle_cell']:.3f} (the grid's limit)"
        )
    report["correspondence"] = corr


def _check_eval_outputs(args: argparse.Namespace) -> None:
    """Every file eval writes, checked before any work (missing folders are created at the end)."""
    if args.out:
        writable_file(args.out, "--out")
    if args.uncertainty_csv:
        writable_file(args.uncertainty_csv, "--uncertainty-csv")
    for flag, path in (("--uncertainty-figure", args.uncertainty_figure), ("--groups-figure", args.groups_figure)):
        if path:
            figure_file(path, flag)


def _eval_uncertainty(args, retriever, name, dataset, gallery, report: dict) -> None:
    from glassmetric.retrieval.uncertainty import (
        evaluate_uncertainty,
        object_statistics,
        uncertainty_vs_ground_truth,
        write_csv,
    )

    if "uncertainty" not in retriever.fields:
        raise ConfigError(
            "--uncertainty: this checkpoint has no uncertainty head (train with model.uncertainty_dim > 0)"
        )
    cfg = retriever.cfg
    rep = evaluate_uncertainty(
        retriever.model,
        dataset,
        gallery,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers,
        device=retriever.device,
        progress=True,
    )
    summary = rep.summary()
    print(
        f"uncertainty of {summary['n_queries']} queries: AUROC for R@1 failure {summary['auroc_uncertainty_vs_r1_failure']:.3f}; "
        f"R@1 of the certain half {100 * summary['recall@1_certain_half']:.2f}, "
        f"of the uncertain half {100 * summary['recall@1_uncertain_half']:.2f}"
    )
    stats = object_statistics(dataset, rep.index)
    if stats is not None:  # data with boxes and part keypoints (CUB): does doubt follow visibility?
        summary["spearman"] = uncertainty_vs_ground_truth(rep.uncertainty, stats)
        print(
            "Spearman rho of the uncertainty with "
            + ", ".join(f"{name} {v['rho']:+.3f} (p {v['p']:.2g})" for name, v in summary["spearman"].items())
        )
    if args.uncertainty_csv:
        Path(args.uncertainty_csv).parent.mkdir(parents=True, exist_ok=True)
        write_csv(rep, args.uncertainty_csv)
        print(f"per-image uncertainties written to {args.uncertainty_csv}")
    if args.uncertainty_figure:
        from glassmetric.explain.figures import save_figure
        from glassmetric.explain.uncertainty import extremes, uncertainty_grid_figure

        most, least = extremes(rep.uncertainty, 12)

        def show(rows):
            return [dataset.load(int(rep.index[i])).image for i in rows]

        fig = uncertainty_grid_figure(
            show(most),
            rep.uncertainty[most],
            rep.correct[most],
            show(least),
            rep.uncertainty[least],
            rep.correct[least],
        )
        print(f"figure written to {save_figure(fig, args.uncertainty_figure)}")
    report["uncertainty"] = summary


def _eval_group_parts(args, retriever, name, dataset, gallery, report: dict) -> None:
    from glassmetric.explain.group_parts import evaluate_group_parts

    cfg, model = retriever.cfg, retriever.model
    out = evaluate_group_parts(
        model,
        dataset,
        images=args.groups_parts,
        fraction=args.groups_fraction,
        crop=cfg.data.eval_image_size or cfg.data.image_size,
        resize=cfg.data.resize,
        seed=cfg.seed,
        device=retriever.device,
        mean=model.backbone.mean,
        std=model.backbone.std,
        num_workers=cfg.data.num_workers,
    )
    pairs = ", ".join(f"{p} {v:.3f}" for p, v in out["iou_pairs"].items())
    print(
        f"group distinctness over {out['n_images']} images: top-{100 * out['fraction']:.0f}% region IoU "
        f"{out['iou']:.3f} ({pairs}; chance {out['iou_chance']:.3f}, {out['n_top']} of {out['positions']} positions)"
    )
    for g, v in out["groups"].items():
        print(
            f"  group {g}: attention peak nearest the {v['part']} in {100 * v['share']:.1f}% of the images "
            f"(peak at its most frequent position in {100 * v['fixed_position']:.1f}%; attends to "
            f"{v['spread']:.1f} of {out['positions']} positions)"
        )
    print(f"  mutual information between group and part {out['mi']:.3f} nats (random maps {out['mi_random']:.3f})")
    report["group_parts"] = out


def _eval_groups_figure(args, retriever, name, dataset, gallery, report: dict) -> None:
    import numpy as np

    from glassmetric.explain.figures import group_attention_grid_figure, save_figure
    from glassmetric.explain.frames import framed

    cfg, parts = retriever.cfg, report.get("group_parts")
    if "attention" not in retriever.fields:
        raise ConfigError("--groups-figure: the checkpoint has no attention groups (train with model.groups > 0)")
    picked = np.sort(np.random.default_rng(cfg.seed).choice(len(dataset), size=min(12, len(dataset)), replace=False))
    raw = [dataset.load(int(i)).image for i in picked]
    att = retriever.embed(raw, fields=("attention",)).attention
    heads = [v["part"] for v in parts["groups"].values()] if parts else None
    fig = group_attention_grid_figure(
        [framed(cfg, img) for img in raw],
        att.float().cpu(),
        group_parts=heads,
        titles=[f"class {int(dataset.labels[i])}" for i in picked],
    )
    print(f"figure written to {save_figure(fig, args.groups_figure)}")


#: eval's analyses, in the order they run: (is it asked for?, handler adding its part to the report)
_EVAL_ANALYSES = (
    (lambda a: True, _eval_metrics),
    (lambda a: bool(a.correspondence), _eval_correspondence),
    (lambda a: bool(a.uncertainty or a.uncertainty_csv or a.uncertainty_figure), _eval_uncertainty),
    (lambda a: bool(a.groups_parts), _eval_group_parts),
    (lambda a: bool(a.groups_figure), _eval_groups_figure),
)


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise ConfigError(f"--k: expected integers separated by commas, e.g. 0,10,100, got {text!r}") from None
    if any(k < 0 for k in ks):
        raise ConfigError(f"--k: shortlist sizes must be >= 0, got {text!r}")
    return ks


def _cmd_explain(args: argparse.Namespace) -> int:
    from glassmetric.explain.figures import save_figure
    from glassmetric.explain.panels import group_summary, pair_figures, pair_summary
    from glassmetric.retriever import Retriever

    if args.top_flows < 0:
        raise ConfigError(f"--top-flows: expected a number of flows >= 0, got {args.top_flows}")
    figure_file(args.output, "-o")
    retriever = Retriever.from_checkpoint(args.checkpoint, "cpu")
    titles = (Path(args.image_x).name, Path(args.image_y).name)
    grouping = "attention" in retriever.fields  # the per-group panels, structural or not
    if not grouping:
        retriever.model.require_local()
    pair = retriever.explain(args.image_x, args.image_y)
    figures = pair_figures(pair, titles, top_flows=args.top_flows)
    path = save_figure(figures["groups" if grouping else "flows"], args.output)
    print(group_summary(pair) if grouping else "\n".join(pair_summary(pair)))
    print(f"figure written to {path}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from glassmetric.report import build_report
    from glassmetric.retriever import Retriever

    ks = _parse_ks(args.k)
    writable_folder(args.output, "-o")
    retriever = Retriever.from_checkpoint(args.checkpoint, args.device, args.overrides)
    name, dataset, gallery = retriever.eval_data(
        split=args.split, query=args.query, gallery=args.gallery, folder=args.data
    )
    page = build_report(
        retriever,
        dataset,
        gallery,
        args.output,
        data_name=name,
        per_group=args.queries,
        top=args.top,
        ks=ks,
        seed=retriever.cfg.seed,
    )
    print(f"report written to {page} (open it in a browser; it works offline)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from glassmetric.extras import require
    from glassmetric.retrieval.evaluate import default_device
    from glassmetric.serve.gallery import default_cache_dir
    from glassmetric.serve.server import serve

    for module in ("fastapi", "uvicorn"):
        require("serve", module, "glassmetric serve")
    if args.cache_dir:
        writable_folder(args.cache_dir, "--cache-dir")
    else:
        writable_folder(default_cache_dir(), "--cache-dir (default)")
    return serve(
        args.checkpoint,
        args.gallery,
        split=args.split,
        host=args.host,
        port=args.port,
        cache_dir=args.cache_dir,
        device=str(args.device or default_device()),
        max_upload_mb=args.max_upload_mb,
        max_megapixels=args.max_megapixels,
        max_in_flight=args.max_in_flight,
        body_timeout=args.body_timeout,
        workers=args.workers,
        knn=args.knn,
        index_dir=args.index_dir,
        overrides=args.overrides,
        upload_store_mb=args.upload_store_mb,
    )


def _cmd_export(args: argparse.Namespace) -> int:
    from glassmetric.retriever import Retriever

    if args.image_size is not None and not 16 <= args.image_size <= 4096:  # data.image_size's range
        raise ConfigError(f"--image-size: expected between 16 and 4096, got {args.image_size}")
    output = args.output or ("model.safetensors" if args.format == "weights" else "model.onnx")
    writable_file(output, "-o")
    retriever = Retriever.from_checkpoint(args.checkpoint, "cpu")
    model, cfg = retriever.model.model, retriever.cfg  # the model's own heads, as trained
    if args.format == "weights":
        from glassmetric.checkpoints import save_weights

        size = save_weights(model, cfg, output)
        print(
            f"{output}: the model's weights and config ({size / 2**20:.1f} MiB, no optimizer state); "
            "load it with glassmetric.Retriever.from_checkpoint or --checkpoint"
        )
        return 0
    from glassmetric.export.onnx import compare_with_torch, export_onnx, onnx_metadata

    size = args.image_size or cfg.data.eval_image_size or cfg.data.image_size
    names = export_onnx(model, output, size, metadata=onnx_metadata(model, cfg, size))
    print(f"{output}: input images (batch, 3, {size}, {size}); outputs {', '.join(names)}")
    if not args.no_check:
        diffs = compare_with_torch(model, output, size)
        print("onnxruntime vs torch, max abs diff: " + ", ".join(f"{n} {d:.2e}" for n, d in diffs.items()))
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from glassmetric.retriever import Retriever

    writable_file(args.output, "-o")
    retriever = Retriever.from_checkpoint(args.checkpoint, args.device, args.overrides)
    embeddings = retriever.embed(args.data, progress=True)
    embeddings.save_npz(args.output)
    print(
        f"{args.output}: {len(embeddings)} images of {args.data}; {', '.join(embeddings.fields)}, labels, positions, paths"
    )
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from glassmetric.config import PRESET_DIR, preset_names

    for name in preset_names():
        first = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:14s} {first}")
    return 0


COMMANDS = {
    "fit": _cmd_fit,
    "eval": _cmd_eval,
    "embed": _cmd_embed,
    "explain": _cmd_explain,
    "export": _cmd_export,
    "presets": _cmd_presets,
    "report": _cmd_report,
    "serve": _cmd_serve,
}


@contextlib.contextmanager
def _quiet_libraries(verbose: bool) -> Iterator[None]:
    """Keep the console for progress and results: hide library chatter (Lightning's tips and
    possible-misuse warnings, deprecations, faiss' k-means size warning) unless ``verbose``.
    The warning filters and log levels are restored on exit."""
    import logging
    import warnings

    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = lightning_log.level
    with warnings.catch_warnings():
        if not verbose:
            lightning_log.setLevel(logging.WARNING)
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r"NMI: k-means clustering")
            warnings.filterwarnings("ignore", module=r"lightning\.")
        try:
            yield
        finally:
            lightning_log.setLevel(level)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, accepting ``key=value`` overrides anywhere on the line (also after a flag such as
    ``--overwrite``, where plain argparse would call them unrecognised)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        stray = [a for a in extra if a.startswith("-") or "=" not in a]
        if stray or not hasattr(args, "overrides"):
            parser.verbs[args.command].error(f"unrecognized arguments: {' '.join(stray or extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        with _quiet_libraries(args.verbose):
            return COMMANDS[args.command](args)
    except GlassmetricError as e:
        print(f"glassmetric {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"glassmetric {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
