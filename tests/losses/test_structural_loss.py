"""Structural losses: pytorch-metric-learning losses on DIML's structural similarity of a batch,
checked against the same losses fed a matrix built pair by pair with POT."""

import numpy as np
import ot
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

from glassmetric.errors import ConfigError
from glassmetric.losses.metric_losses import build_loss
from glassmetric.losses.structural import StructuralSettings, pack, unpack
from glassmetric.models.output import EmbeddingOutput

B, N, D = 12, 9, 6
SETTINGS = StructuralSettings(cells=N, dim=D, epsilon=0.05, iters=500, chunk_size=5)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    glob = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    local = torch.nn.functional.normalize(torch.randn(B, N, D, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.arange(4).repeat_interleave(3)
    return glob, local, labels


def brute_force_ss(glob, local):
    """SS[a, b] by POT's log-domain Sinkhorn, one pair at a time, with the DIML marginals."""
    out = np.zeros((B, B))
    for a in range(B):
        for b in range(B):
            s = (local[a] @ local[b].T).numpy()
            mu = np.maximum(local[a].numpy() @ glob[b].numpy(), 0)
            nu = np.maximum(local[b].numpy() @ glob[a].numpy(), 0)
            mu = mu / mu.sum() if mu.sum() > 1e-8 else np.full(N, 1 / N)
            nu = nu / nu.sum() if nu.sum() > 1e-8 else np.full(N, 1 / N)
            plan = ot.sinkhorn(mu, nu, 1 - s, 0.05, method="sinkhorn_log", numItermax=2000, stopThr=1e-10)
            out[a, b] = (plan * s).sum()
    return torch.from_numpy(out)


def precomputed(base_cls, matrix):
    """A distance of the loss's own calibration that returns a fixed (reference) matrix."""

    class Precomputed(base_cls):
        def compute_mat(self, query_emb, ref_emb):
            return matrix.clone()  # miners modify their matrix in place

    return Precomputed()


@pytest.fixture(scope="module")
def reference():
    glob, local, labels = batch()
    return glob, local, labels, brute_force_ss(glob, local).float()


def test_pack_unpack_round_trip():
    glob, local, _ = batch()
    g, l = unpack(pack(glob, local) * 3.0, SETTINGS)  # a global rescale is undone
    torch.testing.assert_close(g, glob)
    torch.testing.assert_close(l, local)


@pytest.mark.parametrize("name, calibration", [("multisimilarity", "similarity"), ("contrastive", "distance"), ("triplet", "distance")])
def test_loss_equals_the_loss_on_a_brute_force_matrix(name, calibration, reference):
    glob, local, labels, ss = reference
    loss = build_loss(name, embedding_dim=D, num_classes=4, structural=SETTINGS)
    ours = loss(EmbeddingOutput(embedding=glob, local=local), labels)

    if calibration == "similarity":
        base, mat = CosineSimilarity, ss
        ref_loss = pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
        ref_miner = pml_miners.MultiSimilarityMiner(epsilon=0.1)
    else:
        base, mat = LpDistance, torch.sqrt(torch.clamp(2 - 2 * ss, min=1e-12))
        if name == "contrastive":
            ref_loss, ref_miner = pml_losses.ContrastiveLoss(pos_margin=0, neg_margin=1), None
        else:
            ref_loss = pml_losses.TripletMarginLoss(margin=0.2)
            ref_miner = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    ref_loss.distance = precomputed(base, mat)
    embeddings = torch.zeros(B, 1)
    indices = None
    if ref_miner is not None:
        ref_miner.distance = precomputed(base, mat)
        indices = ref_miner(embeddings, labels)
    expected = ref_loss(embeddings, labels, indices)
    assert float(ours) == pytest.approx(float(expected), rel=1e-4, abs=1e-5)


def test_gradients_reach_local_embeddings_through_s():
    glob, local, labels = batch()
    local = local.float().requires_grad_()
    glob = glob.float().requires_grad_()
    loss = build_loss("multisimilarity", embedding_dim=D, num_classes=4, structural=SETTINGS)
    loss(EmbeddingOutput(embedding=glob, local=local), labels).backward()
    assert local.grad.abs().sum() > 0
    # the plan is a constant: the global embedding (which only shapes the marginals) gets none
    assert glob.grad is None or glob.grad.abs().max() < 1e-6


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="pair-based"):
        build_loss("proxyanchor", embedding_dim=D, num_classes=4, structural=SETTINGS)
    glob, local, labels = batch()
    loss = build_loss("triplet", embedding_dim=D, num_classes=4, structural=SETTINGS)
    with pytest.raises(ConfigError, match="spatial_grid"):
        loss(EmbeddingOutput(embedding=glob), labels)
