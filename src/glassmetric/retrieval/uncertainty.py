"""Does the model know when it is unsure? Per-image uncertainty (IDML) against retrieval failure.

For every query image: its uncertainty ``||u||`` (:func:`glassmetric.similarity.introspective.image_uncertainty`)
and whether its nearest neighbour by the semantic embedding is of another class (an R@1
failure; the query itself excluded when it is in the gallery). The AUROC of the uncertainty as
a score for "R@1 is wrong" is 0.5 for an uncertainty that knows nothing and 1.0 for one that
ranks every failure above every success.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from glassmetric.data.base import RetrievalDataset
from glassmetric.retrieval.embed import embed_fields
from glassmetric.retrieval.knn import knn
from glassmetric.similarity.introspective import image_uncertainty


@dataclass
class UncertaintyReport:
    uncertainty: np.ndarray  # (N,) per query image
    labels: np.ndarray  # (N,)
    neighbour: np.ndarray  # (N,) index of the nearest gallery item
    correct: np.ndarray  # (N,) bool: R@1 hit
    auroc: float  # of uncertainty for "R@1 is wrong" (nan when every query hits or every one fails)
    recall_at_1_certain_half: float  # R@1 of the half of the queries with the lowest uncertainty
    recall_at_1_uncertain_half: float
    # (N,) position of each query in its data set (differs from 0..N-1 when unreadable images
    # were skipped); None: 0..N-1
    index: np.ndarray | None = None

    def __post_init__(self):
        if self.index is None:
            self.index = np.arange(len(self.uncertainty))

    def summary(self) -> dict:
        return {
            "auroc_uncertainty_vs_r1_failure": self.auroc,
            "recall@1_certain_half": self.recall_at_1_certain_half,
            "recall@1_uncertain_half": self.recall_at_1_uncertain_half,
            "uncertainty_mean": float(self.uncertainty.mean()) if len(self.uncertainty) else float("nan"),
            "uncertainty_std": float(self.uncertainty.std()) if len(self.uncertainty) else float("nan"),
            "n_queries": len(self.uncertainty),
        }


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive`` (ties count half)."""
    from sklearn.metrics import roc_auc_score

    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, np.asarray(scores, dtype=np.float64)))


def uncertainty_vs_failure(
    uncertainty: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
) -> UncertaintyReport:
    """The report from embeddings: ``uncertainty`` (N,), semantic ``query`` (N, D)."""
    same = gallery is None
    ref, ref_labels = query, query_labels
    if gallery is not None:
        if gallery_labels is None:
            raise ValueError("gallery_labels are needed with a gallery")
        ref, ref_labels = gallery, gallery_labels
    _, idx = knn(query, ref, 1, exclude_self=same)
    neighbour = idx[:, 0]
    correct = (ref_labels[neighbour] == query_labels).numpy()
    u = uncertainty.double().numpy()
    order = np.argsort(u, kind="stable")
    half = len(u) // 2

    def r1(sel: np.ndarray) -> float:
        return float(correct[sel].mean()) if len(sel) else float("nan")

    return UncertaintyReport(
        uncertainty=u,
        labels=query_labels.numpy(),
        neighbour=neighbour.numpy(),
        correct=correct,
        auroc=auroc(u, ~correct),
        recall_at_1_certain_half=r1(order[:half]),
        recall_at_1_uncertain_half=r1(order[half:]),
    )


def evaluate_uncertainty(
    model: torch.nn.Module,
    dataset: RetrievalDataset,
    gallery: RetrievalDataset | None = None,
    **embed_kw,
) -> UncertaintyReport:
    """Embed ``dataset`` (and ``gallery``) and relate each query's uncertainty to its R@1 hit.

    Images skipped as unreadable (``data.on_bad_image: skip``) are left out; the report's
    ``index`` and ``neighbour`` are positions in ``dataset`` and in the gallery (``dataset``
    itself when there is none), so they name the right images either way."""
    out = embed_fields(model, dataset, fields=("embedding", "uncertainty"), **embed_kw)
    ref = embed_fields(model, gallery, fields=("embedding",), **embed_kw) if gallery is not None else None
    report = uncertainty_vs_failure(
        image_uncertainty(out["uncertainty"]),
        out["embedding"],
        out["labels"],
        ref["embedding"] if ref else None,
        ref["labels"] if ref else None,
    )
    report.index = out["index"].numpy()
    report.neighbour = (ref or out)["index"].numpy()[report.neighbour]
    return report


def object_statistics(dataset: RetrievalDataset, indices=None) -> dict[str, np.ndarray] | None:
    """Per image, from its ground truth: ``box_area_share`` (box area / image area) and
    ``visible_parts`` (keypoints flagged visible); None when the data set has no boxes.

    ``indices``: the images, in this order (default all; e.g. an uncertainty report's
    ``index``, which leaves out the images skipped as unreadable). An unreadable image gets NaN
    under ``data.on_bad_image: skip``; under ``error`` it raises, naming the file."""
    indices = range(len(dataset)) if indices is None else [int(i) for i in indices]
    share, parts = np.full(len(indices), np.nan), np.full(len(indices), np.nan)
    has_boxes = None
    for row, i in enumerate(indices):
        sample = dataset.load_readable(i)
        if sample is None:
            continue
        if has_boxes is None:
            has_boxes = sample.bbox is not None
            if not has_boxes:
                return None
        w, h = sample.image.size
        assert sample.bbox is not None  # a data set has boxes for every image or for none
        share[row] = sample.bbox[2] * sample.bbox[3] / float(w * h)
        parts[row] = float((sample.keypoints[:, 2] > 0).sum()) if sample.keypoints is not None else np.nan
    if not has_boxes:  # no image, or none readable
        return None
    return {"box_area_share": share, "visible_parts": parts}


def uncertainty_vs_ground_truth(uncertainty: np.ndarray, stats: dict[str, np.ndarray]) -> dict[str, dict]:
    """Spearman rank correlation (rho, two-sided p, n) of the uncertainty with each statistic of
    :func:`object_statistics` (NaN entries left out). A model whose doubt tracks visibility
    should be more uncertain about small birds and birds with few visible parts (rho < 0)."""
    from scipy.stats import spearmanr

    out = {}
    u = np.asarray(uncertainty, dtype=np.float64)
    for name, values in stats.items():
        keep = np.isfinite(values) & np.isfinite(u)
        if keep.sum() < 3 or np.ptp(values[keep]) == 0 or np.ptp(u[keep]) == 0:
            out[name] = {"rho": float("nan"), "p": float("nan"), "n": int(keep.sum())}
            continue
        rho, pvalue = spearmanr(u[keep], values[keep])
        out[name] = {"rho": float(rho), "p": float(pvalue), "n": int(keep.sum())}
    return out


def write_csv(report: UncertaintyReport, path, names: list[str] | None = None) -> None:
    """One row per query: index, name, label, uncertainty, nearest neighbour, hit."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "name", "label", "uncertainty", "nearest_neighbour", "r1_correct"])
        assert report.index is not None  # set by __post_init__
        for i in range(len(report.uncertainty)):
            index = int(report.index[i])
            w.writerow(
                [
                    index,
                    names[index] if names else "",
                    int(report.labels[i]),
                    f"{report.uncertainty[i]:.6g}",
                    int(report.neighbour[i]),
                    int(report.correct[i]),
                ]
            )
