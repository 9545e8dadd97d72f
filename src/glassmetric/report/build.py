"""Compute everything the HTML report shows, and write it to a folder.

The queries are embedded once (global, local and uncertainty embeddings, as the model has
them); from those come the metrics table, the K-sweep of structural re-ranking, each query's
R@1 hit and AP@R (to pick the worst, a random sample and the best queries), their top results
under the global ranking and after structural re-ranking
(:func:`glassmetric.report.rankings.rerank_query`, with each result's rank move) and the
scores of those results. Every shown pair is then explained from its two images
(:meth:`glassmetric.Retriever.explain`), its figures written next to the page.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from glassmetric.config import Config
from glassmetric.data.base import RetrievalDataset
from glassmetric.errors import ConfigError
from glassmetric.explain.figures import save_figure
from glassmetric.explain.pair import model_view
from glassmetric.explain.panels import pair_figures, pair_summary
from glassmetric.factory import evaluation_recall_ks
from glassmetric.models.heads import GROUPING
from glassmetric.report.data import QueryRow, ReportData, Result
from glassmetric.report.html import write_html
from glassmetric.report.plots import sweep_figure
from glassmetric.report.queries import select_queries
from glassmetric.report.rankings import as_embeddings, rank_moves, rerank_query
from glassmetric.retrieval.knn import knn
from glassmetric.retrieval.metrics import retrieval_metrics
from glassmetric.retrieval.per_query import per_query_metrics, relevant_counts
from glassmetric.retrieval.rerank import rerank_sweep
from glassmetric.retrieval.shortlist import score_shortlist
from glassmetric.retriever import Retriever
from glassmetric.retriever.model import InferenceModel
from glassmetric.similarity.introspective import image_uncertainty

__all__ = ["QueryRow", "ReportData", "Result", "build_report", "report_fields"]

#: the shortlist sizes swept by default (capped at the gallery size)
REPORT_KS = (0, 5, 10, 50, 100)


def report_fields(retriever: Retriever) -> tuple[str, ...]:
    """The embedding fields the report and the explorer read: the global embedding, local cells
    when the model gives them, the uncertainty embedding with an uncertainty head."""
    return tuple(f for f in retriever.fields if f in ("embedding", "local", "uncertainty"))


def _describe_model(cfg: Config, fields: tuple[str, ...], model: InferenceModel) -> str:
    m = cfg.model
    parts = [f"{m.backbone}, {m.embedding_dim}-d, loss {cfg.loss.name} on {cfg.loss.similarity} similarity"]
    if "local" in fields:
        parts.append(
            f"structural {cfg.model.spatial_grid or 4}x{cfg.model.spatial_grid or 4} cells"
            + ("" if m.spatial_grid else " (training-free)")
        )
    if GROUPING in model.extra_heads:
        parts.append(f"{m.groups} attention groups")
    if "uncertainty" in fields:
        parts.append(f"uncertainty head ({m.uncertainty_dim}-d)")
    return "; ".join(parts)


def _class_name(dataset: RetrievalDataset, label: int) -> str:
    names = getattr(dataset, "class_names", None)
    return str(names[label]) if names is not None and 0 <= label < len(names) else f"class {label}"


def _image_name(dataset: RetrievalDataset, position: int) -> str:
    """The image's file name when it came from a file, else ``image <position>``."""
    paths = getattr(dataset, "paths", None)
    return Path(paths[position]).name if paths is not None and 0 <= position < len(paths) else f"image {position}"


def build_report(
    retriever: Retriever,
    dataset: RetrievalDataset,
    gallery: RetrievalDataset | None,
    out_dir: str | Path,
    *,
    data_name: str = "",
    per_group: int = 4,
    top: int = 10,
    ks: tuple[int, ...] = REPORT_KS,
    seed: int = 0,
    dpi: int = 80,
    top_flows: int = 64,
    rerank_k: int | None = None,
    progress: bool = True,
) -> Path:
    """Write ``out_dir/index.html`` (and its ``images/``, ``pairs/`` and ``sweep.png``) for
    ``retriever``'s model on ``dataset`` (against ``gallery``, or itself); returns the page.

    Each shown query lists its global top ``top`` and, for a model with local embeddings, its
    top ``top`` after structural re-ranking of the global top-``rerank_k`` (default: the
    largest K of ``ks``; capped at the gallery), as ``glassmetric eval --rerank structural``
    ranks them."""
    rerank_k_arg = rerank_k
    model, cfg, ot = retriever.model, retriever.cfg, retriever.settings
    checkpoint = retriever.checkpoint or ""
    out = Path(out_dir)
    same = gallery is None
    ref = dataset if gallery is None else gallery
    available = len(ref) - int(same)
    if top < 1 or per_group < 0:
        raise ConfigError(f"--top must be >= 1 and --queries >= 0, got {top} and {per_group}")
    if available < top:
        raise ConfigError(f"the gallery has {available} images to rank, fewer than --top {top}")
    fields = report_fields(retriever)
    n_shown = 3 * min(per_group, max(1, len(dataset) // 3))
    bar = tqdm(
        total=4 + n_shown * top * (2 if "local" in fields else 1), desc="report", unit="step", disable=not progress
    )

    bar.set_postfix_str("embedding")
    q = retriever.embed(dataset, fields=fields, progress=progress).as_dict()
    g = q if same else retriever.embed(ref, fields=fields, progress=progress).as_dict()
    available = len(g["labels"]) - int(same)  # the rows embedded: an image skipped as unreadable has none
    top = min(top, available)
    bar.update()

    bar.set_postfix_str("metrics")
    recall_ks = evaluation_recall_ks(cfg)
    ref_args = () if same else (g["embedding"], g["labels"])
    metrics = retrieval_metrics(
        q["embedding"], q["labels"], *ref_args, recall_ks=recall_ks, knn_backend=cfg.eval.knn_backend
    )
    bar.update()

    sweep = None
    if "local" in fields:
        bar.set_postfix_str("re-ranking sweep")
        sweep_ks = tuple(sorted({min(k, available) for k in ks}))
        sweep = rerank_sweep(
            query_global=q["embedding"],
            query_local=q["local"],
            gallery_global=None if same else g["embedding"],
            gallery_local=None if same else g["local"],
            query_labels=q["labels"],
            gallery_labels=None if same else g["labels"],
            ks=sweep_ks,
            recall_ks=recall_ks,
            epsilon=ot.epsilon,
            iters=ot.iters,
            tol=ot.tol,
            marginals=ot.marginals,
        )
    bar.update()

    bar.set_postfix_str("per-query AP@R")
    rerank_k = 0
    if sweep is not None:
        rerank_k = min(max(ks) if rerank_k_arg is None else rerank_k_arg, available)
    r_max = int(relevant_counts(q["labels"], g["labels"]).max()) - int(same)
    depth = min(max(top, r_max, rerank_k, 1), available)
    _, ranked = knn(q["embedding"], g["embedding"], depth, exclude_self=same)
    pq = per_query_metrics(ranked, q["labels"], g["labels"], exclude_self=same)
    chosen = select_queries(pq.hit_at_1, pq.ap_at_r, per_group, seed=seed)
    bar.update()

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    sweep_image = None
    if sweep is not None:
        sweep_image = "sweep.png"
        save_figure(sweep_figure(sweep), out / sweep_image, dpi=100)

    written: dict[tuple[str, int], str] = {}
    explained: dict[tuple[int, int], tuple[dict[str, str], list[str]]] = {}
    # embedding rows -> data-set positions (images skipped as unreadable have no row)
    q_pos, g_pos = q["index"].tolist(), g["index"].tolist()
    gallery_embeddings = as_embeddings(g) if rerank_k else None

    def thumbnail(side: str, data: RetrievalDataset, position: int):
        raw = data.load(position).image
        key = ("item" if same else side, position)
        if key not in written:
            written[key] = f"images/{key[0]}-{position}.png"
            model_view(cfg, raw).save(out / written[key])
        return raw, written[key]

    def explain(qi: int, q_raw, gi: int, g_raw) -> tuple[dict[str, str], list[str]]:
        key = (q_pos[qi], g_pos[gi])
        if key not in explained:
            pair = retriever.explain(q_raw, g_raw)
            figures = {}
            titles = (f"query {_image_name(dataset, q_pos[qi])}", _image_name(ref, g_pos[gi]))
            for kind, fig in pair_figures(pair, titles, top_flows=top_flows).items():
                figures[kind] = f"pairs/{'item' if same else 'query'}-{key[0]}_{key[1]}_{kind}.png"
                save_figure(fig, out / figures[kind], dpi=dpi)
            explained[key] = (figures, pair_summary(pair))
        return explained[key]

    def results(qi: int, q_raw, rows: list[int], ordered_by: str, moves=None, scores=None) -> list[Result]:
        scored = score_shortlist(
            {k: v[[qi]] for k, v in q.items() if k != "labels"},
            g,
            torch.tensor([rows]),
            epsilon=ot.epsilon,
            iters=ot.iters,
            tol=ot.tol,
            marginals=ot.marginals,
            introspective=retriever.introspective,
        )
        out_rows = []
        for r, (gi, values) in enumerate(zip(rows, scored.scores(0), strict=True)):
            if scores is not None:  # the re-ranking's own scores: the ones that ordered it
                values.update(scores[r])
            g_raw, g_img = thumbnail("gallery", ref, g_pos[gi])
            figures, lines = explain(qi, q_raw, gi, g_raw)
            move = None if moves is None else moves[r]
            out_rows.append(
                Result(
                    rank=r + 1,
                    index=g_pos[gi],
                    image=g_img,
                    name=_image_name(ref, g_pos[gi]),
                    label=_class_name(ref, int(g["labels"][gi])),
                    correct=bool(g["labels"][gi] == q["labels"][qi]),
                    scores=values,
                    score=values[ordered_by],
                    figures=figures,
                    lines=lines,
                    global_rank=None if move is None else r + 1 + move,
                    move=move,
                )
            )
            bar.update()
        return out_rows

    groups: dict[str, list[QueryRow]] = {}
    for group, indices in chosen.items():
        rows = []
        bar.set_postfix_str(f"explaining {group} queries")
        for qi in indices:
            q_raw, q_img = thumbnail("query", dataset, q_pos[qi])
            global_rows = ranked[qi, :top].tolist()
            reranked: list[Result] = []
            if rerank_k and gallery_embeddings is not None:
                rr = rerank_query(
                    retriever,
                    as_embeddings({k: v[[qi]] for k, v in q.items()}),
                    gallery_embeddings,
                    k=rerank_k,
                    n=top,
                    exclude=qi if same else None,
                )
                rr_rows = rr.indices[0].tolist()
                own = [
                    {
                        "global": float(rr.global_scores[0, r]),
                        "structural": float(rr.structural_scores[0, r]),
                        "multiscale": float(rr.scores[0, r]),
                    }
                    for r in range(len(rr_rows))
                ]
                moves = rank_moves(rr_rows, ranked[qi].tolist())
                reranked = results(qi, q_raw, rr_rows, "multiscale", moves, own)
            shown = results(qi, q_raw, global_rows, "global")
            u = q.get("uncertainty")
            rows.append(
                QueryRow(
                    index=q_pos[qi],
                    image=q_img,
                    name=_image_name(dataset, q_pos[qi]),
                    label=_class_name(dataset, int(q["labels"][qi])),
                    hit_at_1=bool(pq.hit_at_1[qi]),
                    ap_at_r=float(pq.ap_at_r[qi]),
                    results=shown,
                    reranked=reranked,
                    rerank_k=rerank_k if reranked else 0,
                    uncertainty=None if u is None else float(image_uncertainty(u[[qi]].float())[0]),
                )
            )
        groups[group] = rows
    bar.close()
    report = ReportData(
        title=f"glassmetric report: {Path(checkpoint).name or 'model'}",
        checkpoint=str(checkpoint),
        data=data_name,
        model=_describe_model(cfg, fields, model),
        metrics=metrics,
        sweep=sweep,
        sweep_image=sweep_image,
        groups=groups,
        n_queries=len(q["labels"]),
        n_gallery=len(g["labels"]),
    )
    return write_html(report, out / "index.html")
