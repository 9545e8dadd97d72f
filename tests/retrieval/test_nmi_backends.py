"""NMI's k-means: faiss' (as AccuracyCalculator runs it) where faiss is installed, sklearn's
where it is not; faiss' own stderr warning on small sets becomes a Python warning."""

import sys

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from glassmetric.retrieval.metrics import KMeansSizeWarning, retrieval_metrics


def _clusters() -> tuple[torch.Tensor, torch.Tensor]:
    """30 points in 5 noisy classes: fewer points than faiss advises for 5 centroids (5 x 39)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat_interleave(6)
    x = torch.randn(5, 16, generator=g)[labels] + 0.8 * torch.randn(30, 16, generator=g)
    return torch.nn.functional.normalize(x, dim=1), labels


def _nmi(x: torch.Tensor, labels: torch.Tensor, backend: str) -> float:
    return retrieval_metrics(x, labels, include=("nmi",), nmi_backend=backend, seed=3)["nmi"]


def test_faiss_k_means_is_faiss_defaults_and_warns_in_python_not_on_stderr(capfd):
    faiss = pytest.importorskip("faiss")
    x, labels = _clusters()
    assert faiss.ClusteringParameters().min_points_per_centroid == 39  # what faiss advises per centroid
    with pytest.warns(
        KMeansSizeWarning, match=r"clustering 30 points to 5 centroids \(faiss advises at least 195 points\)"
    ):
        got = _nmi(x, labels, "faiss")
    assert "WARNING clustering" not in capfd.readouterr().err
    reference = faiss.Kmeans(16, 5, niter=20, seed=3)  # AccuracyCalculator's k-means, faiss' defaults
    reference.train(x.numpy())
    clusters = reference.index.search(x.numpy(), 1)[1][:, 0]
    assert got == pytest.approx(normalized_mutual_info_score(labels.numpy(), clusters), abs=1e-12)


def test_auto_is_faiss_where_installed_and_sklearn_where_not(monkeypatch):
    x, labels = _clusters()
    clusters = KMeans(5, n_init=10, random_state=3).fit_predict(np.ascontiguousarray(x.numpy()))
    sklearn_nmi = normalized_mutual_info_score(labels.numpy(), clusters)
    pytest.importorskip("faiss")
    with pytest.warns(KMeansSizeWarning):
        assert _nmi(x, labels, "auto") == _nmi(x, labels, "faiss")
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert _nmi(x, labels, "auto") == pytest.approx(sklearn_nmi, abs=1e-12)
