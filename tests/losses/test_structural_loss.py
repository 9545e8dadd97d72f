"""Structural losses: pytorch-metric-learning losses on DIML's structural similarity of a batch,
checked against the same losses fed a matrix built pair by pair with POT (values, and gradients
through S with the POT plans held constant)."""

import os

import numpy as np
import ot
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

from glassmetric.errors import ConfigError
from glassmetric.losses import StructuralLoss, StructuralSettings
from glassmetric.losses.metric_losses import build_loss
from glassmetric.losses.structural import batch_structural_similarity
from glassmetric.models.output import EmbeddingOutput
from glassmetric.similarity import OTSettings, lane_sinkhorn

B, N, D = 12, 9, 6
OT = OTSettings(epsilon=0.05, iters=2000, tol=1e-9)
SETTINGS = StructuralSettings(ot=OT, chunk_size=5)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    glob = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    local = torch.nn.functional.normalize(torch.randn(B, N, D, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.arange(4).repeat_interleave(3)
    return glob, local, labels


def pot_plans(glob, local):
    """T[a, b] by POT's log-domain Sinkhorn (its batched solver) for every pair (a, b), with the
    DIML marginals written out pair by pair."""
    S, mu, nu = np.zeros((B * B, N, N)), np.zeros((B * B, N)), np.zeros((B * B, N))
    for a in range(B):
        for b in range(B):
            s = (local[a] @ local[b].T).detach().numpy()
            m = np.maximum(local[a].detach().numpy() @ glob[b].detach().numpy(), 0)
            n = np.maximum(local[b].detach().numpy() @ glob[a].detach().numpy(), 0)
            S[a * B + b] = s
            mu[a * B + b] = m / m.sum() if m.sum() > 1e-8 else np.full(N, 1 / N)
            nu[a * B + b] = n / n.sum() if n.sum() > 1e-8 else np.full(N, 1 / N)
    res = ot.solve_batch(
        torch.from_numpy(1 - S),
        reg=0.05,
        a=torch.from_numpy(mu),
        b=torch.from_numpy(nu),
        method="log_sinkhorn",
        reg_type="entropy",
        max_iter=3000,
        tol=1e-11,
        grad="detach",
    )
    return res.plan.reshape(B, B, N, N)


def ss_with_constant_plans(plans, local):
    """SS[a, b] = sum_ij T_ab,ij <x_a,i, x_b,j>, differentiable in ``local`` with T held fixed."""
    S = torch.einsum("aid,bjd->abij", local, local)
    return (plans.to(S.dtype) * S).sum((-2, -1))


def precomputed(base_cls, matrix):
    """A distance of the loss's own calibration that returns a fixed (reference) matrix."""

    class Precomputed(base_cls):
        def compute_mat(self, query_emb, ref_emb):
            return matrix.clone()  # miners modify their matrix in place

    return Precomputed()


@pytest.fixture(scope="module")
def plans():
    glob, local, _ = batch()
    return pot_plans(glob, local)


@pytest.fixture(scope="module")
def reference(plans):
    glob, local, labels = batch()
    return glob, local, labels, ss_with_constant_plans(plans, local).float()


@pytest.mark.parametrize(
    "name, calibration", [("multisimilarity", "similarity"), ("contrastive", "distance"), ("triplet", "distance")]
)
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
    glob, _local, labels = batch()
    loss = build_loss("triplet", embedding_dim=D, num_classes=4, structural=SETTINGS)
    with pytest.raises(ConfigError, match="spatial_grid"):
        loss(EmbeddingOutput(embedding=glob), labels)


# --------------------------------------------------------------------------- StructuralLoss


def test_structural_loss_is_the_pml_loss_on_the_structural_matrix(reference):
    """StructuralLoss(MultiSimilarityLoss()) used as a pytorch-metric-learning loss equals
    MultiSimilarityLoss on the POT matrix; with a miner, the miner also mines that matrix."""
    glob, local, labels, ss = reference
    ours = StructuralLoss(pml_losses.MultiSimilarityLoss(), OT)(glob, local, labels)
    ref_loss = pml_losses.MultiSimilarityLoss()
    ref_loss.distance = precomputed(CosineSimilarity, ss)
    assert float(ours) == pytest.approx(float(ref_loss(torch.zeros(B, 1), labels)), rel=1e-4, abs=1e-6)

    mined = StructuralLoss(pml_losses.MultiSimilarityLoss(), OT, miner=pml_miners.MultiSimilarityMiner(0.1))
    ref_miner = pml_miners.MultiSimilarityMiner(0.1)
    ref_miner.distance = precomputed(CosineSimilarity, ss)
    expected = ref_loss(torch.zeros(B, 1), labels, ref_miner(torch.zeros(B, 1), labels))
    assert float(mined(glob, local, labels)) == pytest.approx(float(expected), rel=1e-4, abs=1e-6)

    # a distance-calibrated loss sees sqrt(2 - 2 SS)
    contrastive = StructuralLoss(pml_losses.ContrastiveLoss(), OT)(glob, local, labels)
    ref_c = pml_losses.ContrastiveLoss()
    ref_c.distance = precomputed(LpDistance, torch.sqrt(torch.clamp(2 - 2 * ss, min=1e-12)))
    assert float(contrastive) == pytest.approx(float(ref_c(torch.zeros(B, 1), labels)), rel=1e-4, abs=1e-6)


def test_structural_loss_gradients_are_those_through_s_with_the_plan_constant(plans):
    glob, local, labels = batch()
    ref_local = local.clone().requires_grad_()
    matrix = ss_with_constant_plans(plans, ref_local)

    class Differentiable(CosineSimilarity):
        def compute_mat(self, query_emb, ref_emb):
            return matrix.clone()

    ref_loss = pml_losses.MultiSimilarityLoss()
    ref_loss.distance = Differentiable()
    ref_loss(torch.zeros(B, 1, dtype=torch.float64), labels).backward()

    ours_local, ours_glob = local.clone().requires_grad_(), glob.clone().requires_grad_()
    StructuralLoss(pml_losses.MultiSimilarityLoss(), OT)(ours_glob, ours_local, labels).backward()
    assert ref_local.grad.abs().max() > 1e-3
    torch.testing.assert_close(ours_local.grad, ref_local.grad, rtol=1e-4, atol=1e-6)
    # the plan is a constant: the global embedding (which only shapes the marginals) gets none
    assert ours_glob.grad is None or ours_glob.grad.abs().max() == 0


def test_multiscale_structural_loss_adds_the_global_cosine(reference):
    glob, local, labels, ss = reference
    ours = StructuralLoss(pml_losses.MultiSimilarityLoss(), OT, multiscale=True)(glob, local, labels)
    ref_loss = pml_losses.MultiSimilarityLoss()
    ref_loss.distance = precomputed(CosineSimilarity, 0.5 * (ss + (glob @ glob.T).float()))
    assert float(ours) == pytest.approx(float(ref_loss(torch.zeros(B, 1), labels)), rel=1e-4, abs=1e-6)


def test_structural_loss_refuses_what_it_cannot_compute():
    glob, local, labels = batch()
    with pytest.raises(ValueError, match="pair-based"):
        StructuralLoss(pml_losses.ProxyAnchorLoss(4, D))
    loss = StructuralLoss(pml_losses.MultiSimilarityLoss())
    with pytest.raises(ValueError, match=r"local_emb must be L2-normalised.*norm 2"):
        loss(glob, 2 * local, labels)
    with pytest.raises(ValueError, match="global_emb must be L2-normalised"):
        loss(glob * 1.1, local, labels)
    with pytest.raises(ValueError, match="expected global_emb"):
        loss(local, glob, labels)


def _native_or_skip():
    if not lane_sinkhorn.available():
        if os.environ.get("GLASSMETRIC_REQUIRE_NATIVE") == "1":
            pytest.fail("native lane kernel required but unavailable")
        pytest.skip("no C compiler: the native lane kernel is unavailable")
    return lane_sinkhorn


def float32_batch(b, n, d, seed, zero_cells=0):
    """A float32 batch of ``b`` images (labels in pairs, one class left with a single image when
    ``b`` is odd) whose cells lean towards their global embedding; the last ``zero_cells`` cells
    of every other image are all-zero (what ``normalize`` makes of padded locations)."""
    gen = torch.Generator().manual_seed(seed)
    glob = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=-1)
    local = torch.nn.functional.normalize(torch.randn(b, n, d, generator=gen) + 1.5 * glob[:, None], dim=-1)
    if zero_cells:
        local[::2, n - zero_cells :] = 0
    return glob, local, torch.arange(b) // 2


def loss_and_grads(loss_fn, glob, local, labels):
    g, x = glob.clone().requires_grad_(), local.clone().requires_grad_()
    loss = loss_fn(g, x, labels)
    loss.backward()
    return loss.detach(), g.grad if g.grad is not None else torch.zeros_like(g), x.grad


@pytest.mark.parametrize(
    "b, n, d, zero_cells, chunk, marginals, multiscale",
    [
        (16, 16, 32, 0, 32, "cross_correlation", False),  # the cub50 grid, one full lane block per row
        (13, 9, 24, 2, 5, "cross_correlation", True),  # odd batch and chunks, padded cells, multi-scale
        (7, 4, 8, 0, None, "uniform", False),
        (11, 16, 16, 3, 4, "pooled_cross_correlation", True),
    ],
)
@pytest.mark.parametrize("loss_name", ["multisimilarity", "contrastive"])
def test_the_lane_kernel_gives_the_torch_solvers_loss_and_gradients(
    monkeypatch, b, n, d, zero_cells, chunk, marginals, multiscale, loss_name
):
    """With the plan held constant, the loss on float32 CPU embeddings takes its plans from the
    native lane kernel: the loss and its gradients w.r.t. the global and the local embeddings
    equal the torch solver's (the kernel switched off) to float32 rounding (rtol 1e-4 on the
    gradients, whose largest entries are ~1e-2)."""
    lane = _native_or_skip()
    glob, local, labels = float32_batch(b, n, d, seed=b, zero_cells=zero_cells)
    ot_settings = OTSettings(epsilon=0.05, iters=100, tol=1e-4, marginals=marginals)
    make = {"multisimilarity": pml_losses.MultiSimilarityLoss, "contrastive": pml_losses.ContrastiveLoss}[loss_name]
    loss_fn = StructuralLoss(make(), ot_settings, multiscale=multiscale, chunk_size=chunk)

    calls = []
    kernel = lane.lane_structural_similarity
    monkeypatch.setattr(lane, "lane_structural_similarity", lambda *a, **k: calls.append(k) or kernel(*a, **k))
    ours = loss_and_grads(loss_fn, glob, local, labels)
    assert calls and all(k["plan_out"] is not None for k in calls)  # the kernel solved the plans
    with lane.disabled():
        calls.clear()
        torch_path = loss_and_grads(loss_fn, glob, local, labels)
        assert not calls

    assert float(ours[0]) == pytest.approx(float(torch_path[0]), rel=1e-5, abs=1e-6)
    assert float(torch_path[2].abs().max()) > 1e-3
    torch.testing.assert_close(ours[2], torch_path[2], rtol=1e-4, atol=1e-6)  # local
    torch.testing.assert_close(ours[1], torch_path[1], rtol=1e-4, atol=1e-6)  # global: only the cosine term
    if multiscale:
        assert float(torch_path[1].abs().max()) > 1e-3
    else:
        assert float(ours[1].abs().max()) == 0.0
    if zero_cells:  # a zero cell has no direction to move along
        assert bool(torch.isfinite(ours[2]).all())


@pytest.mark.parametrize("tol, iters", [(1e-2, 100), (1e-4, 100), (None, 7)])
def test_the_lane_kernel_stops_each_problem_where_the_torch_solver_does(tol, iters):
    """structural.tol (per-problem stop, checked every 5 iterations) and a fixed iteration count
    give the same matrix on both solvers; the settings are far enough apart that the matrices
    of different stops differ by more than the comparison's tolerance."""
    lane = _native_or_skip()
    glob, local, _ = float32_batch(21, 16, 16, seed=3)
    settings = StructuralSettings(OTSettings(epsilon=0.05, iters=iters, tol=tol), chunk_size=8)
    x = local.clone().requires_grad_()
    ours = batch_structural_similarity(glob, x, settings)
    ours.sum().backward()
    with lane.disabled():
        y = local.clone().requires_grad_()
        torch_path = batch_structural_similarity(glob, y, settings)
        torch_path.sum().backward()
        converged = batch_structural_similarity(glob, local, StructuralSettings(OTSettings(iters=2000, tol=1e-7)))
    torch.testing.assert_close(ours, torch_path, rtol=0, atol=2e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-5)
    if tol != 1e-4:  # stopped early / cut short: far from the converged plans
        assert float((torch_path.detach() - converged).abs().max()) > 1e-4


def test_the_unrolled_gradient_keeps_the_torch_solver(monkeypatch):
    """gradient: unrolled back-propagates through the iterations (and the marginals, hence
    into the global embeddings): the lane kernel, which holds the plan constant, is not used."""
    lane = _native_or_skip()
    glob, local, labels = float32_batch(8, 4, 8, seed=5)
    calls = []
    monkeypatch.setattr(lane, "lane_structural_similarity", lambda *a, **k: calls.append(1))
    loss_fn = StructuralLoss(pml_losses.MultiSimilarityLoss(), OTSettings(iters=30, gradient="unrolled"))
    _, g_grad, _ = loss_and_grads(loss_fn, glob, local, labels)
    assert not calls
    assert float(g_grad.abs().max()) > 0
