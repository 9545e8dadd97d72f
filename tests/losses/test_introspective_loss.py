"""Every pipeline loss on the introspective distance (IDML): brute-force references, the
reduction to the plain loss when uncertainty plays no part, and safe gradients."""

from __future__ import annotations

import math

import pytest
import torch

from glassmetric.errors import ConfigError
from glassmetric.losses.metric_losses import LOSSES, build_loss
from glassmetric.models.output import EmbeddingOutput
from glassmetric.similarity.introspective import IntrospectiveParams

DIM, UDIM, NUM_CLASSES = 8, 4, 5
LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4])


def batch(seed: int, spread: float = 0.8):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(NUM_CLASSES, DIM, generator=g)
    s = torch.nn.functional.normalize(centres[LABELS] + spread * torch.randn(len(LABELS), DIM, generator=g), dim=1)
    u = torch.randn(len(LABELS), UDIM, generator=g)
    return s, u


def build(name: str, params: IntrospectiveParams | None = IntrospectiveParams(), seed: int = 0):
    torch.manual_seed(seed)  # the same proxies / betas for every build with this seed
    return build_loss(name, embedding_dim=DIM, num_classes=NUM_CLASSES, introspective_params=params)


@pytest.mark.parametrize("name", list(LOSSES))
def test_without_uncertainty_effect_every_loss_equals_the_plain_loss(name):
    """With beta_offset = 0 and zero uncertainties (as the proxies have) the shrink factor is 1:
    D = ||s - s'||^2, so the introspective loss must equal the plain loss (same proxies, same
    mining; the seed is reset before each forward for the sampling miner of the margin loss)."""
    s, _ = batch(1)
    u = torch.zeros(len(s), UDIM)
    intro_loss, plain_loss = build(name, IntrospectiveParams(beta_offset=0.0)), build(name, None)
    torch.manual_seed(7)
    intro = intro_loss(EmbeddingOutput(embedding=s, uncertainty=u), LABELS)
    torch.manual_seed(7)
    plain = plain_loss(EmbeddingOutput(embedding=s), LABELS)
    assert float(intro) == pytest.approx(float(plain), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_is_finite_and_trains_the_uncertainty(name):
    s, u = batch(2)
    s.requires_grad_(True)
    u.requires_grad_(True)
    loss = build(name)(EmbeddingOutput(embedding=s, uncertainty=u), LABELS)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(u.grad).all()
    assert u.grad.abs().sum() > 0, f"{name}: no gradient reaches the uncertainty embedding"


@pytest.mark.parametrize("name", list(LOSSES))
def test_duplicate_images_give_no_nan(name):
    """alpha = 0 between copies of one image: values and gradients stay finite."""
    s, u = batch(3)
    s = s.clone()
    s[1], u[1] = s[0], u[0]
    s.requires_grad_(True)
    u.requires_grad_(True)
    loss = build(name)(EmbeddingOutput(embedding=s, uncertainty=u), LABELS)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and torch.isfinite(u.grad).all()


def _d(si, ui, sj, uj, p=IntrospectiveParams()):
    alpha = sum((a - b) ** 2 for a, b in zip(si, sj, strict=True))
    beta = sum((a - b) ** 2 for a, b in zip(ui, uj, strict=True))
    ratio = (p.beta_scale * beta + p.beta_offset) / (p.alpha_scale * alpha + p.alpha_offset)
    return alpha * math.exp(-ratio)


def test_contrastive_matches_brute_force():
    """PML's contrastive form on sqrt(D): mean of the non-zero positive terms sqrt(D) and of the
    non-zero negative terms [1 - sqrt(D)]_+, summed."""
    s, u = batch(4)
    S, U, y = s.double().tolist(), u.double().tolist(), LABELS.tolist()
    pos, neg = [], []
    for i in range(len(S)):
        for j in range(len(S)):
            if i == j:
                continue
            d = math.sqrt(max(_d(S[i], U[i], S[j], U[j]), 1e-12))
            (pos if y[i] == y[j] else neg).append(d if y[i] == y[j] else max(0.0, 1.0 - d))

    def mean_nz(t):
        return sum(v for v in t if v > 0) / max(1, sum(1 for v in t if v > 0))

    expected = mean_nz(pos) + mean_nz(neg)
    got = build("contrastive")(EmbeddingOutput(embedding=s, uncertainty=u), LABELS)
    assert float(got) == pytest.approx(expected, rel=1e-4)


def proxyanchor_release_formula(s, u, proxies):
    """Kim et al.'s ProxyAnchor (margin 0.1, alpha 32) on the release's introspective cosine
    1 - (1 - cos) exp(-(beta + 4) / (5 ||s - p||^2)), proxies with zero uncertainty."""
    proxies = torch.nn.functional.normalize(proxies.detach().double(), dim=1).tolist()
    S, U, y = s.double().tolist(), u.double().tolist(), LABELS.tolist()
    margin, scale = 0.1, 32.0
    pos_terms, neg_terms = [], []
    for c, p in enumerate(proxies):
        cos = [1 - 0.5 * _d(S[i], U[i], p, [0.0] * UDIM) for i in range(len(S))]
        pos = [math.exp(-scale * (cos[i] - margin)) for i in range(len(S)) if y[i] == c]
        neg = [math.exp(scale * (cos[i] + margin)) for i in range(len(S)) if y[i] != c]
        if pos:
            pos_terms.append(math.log(1 + sum(pos)))
        neg_terms.append(math.log(1 + sum(neg)))
    return sum(pos_terms) / len(pos_terms) + sum(neg_terms) / NUM_CLASSES


def test_proxyanchor_matches_the_release_formula():
    s, u = batch(5)
    loss = build("proxyanchor")
    got = loss(EmbeddingOutput(embedding=s, uncertainty=u), LABELS)
    assert float(got) == pytest.approx(proxyanchor_release_formula(s, u, loss.loss.proxies), rel=1e-4)


def test_missing_uncertainty_is_a_config_error():
    s, _ = batch(6)
    with pytest.raises(ConfigError, match=r"model\.uncertainty_dim"):
        build("multisimilarity")(EmbeddingOutput(embedding=s), LABELS)


def test_structural_and_introspective_together_are_refused():
    from glassmetric.losses.structural import StructuralSettings

    with pytest.raises(ConfigError, match="one of structural and introspective"):
        build_loss(
            "multisimilarity",
            embedding_dim=DIM,
            num_classes=NUM_CLASSES,
            structural=StructuralSettings(),
            introspective_params=IntrospectiveParams(),
        )


# --------------------------------------------------------------------------- IntrospectiveLoss


def _hand_distances(s, u, p=IntrospectiveParams()):
    S, U = s.double().tolist(), u.double().tolist()
    # an image with itself: alpha = 0, so D = 0
    return torch.tensor(
        [[_d(S[i], U[i], S[j], U[j], p) if i != j else 0.0 for j in range(len(S))] for i in range(len(S))]
    )


def _fixed(base_cls, matrix):
    class Fixed(base_cls):
        def compute_mat(self, query_emb, ref_emb):
            return matrix.clone()

    return Fixed()


def test_introspective_loss_is_the_pml_loss_on_a_hand_written_distance_matrix():
    """IntrospectiveLoss(base)(semantic, uncertainty, labels) equals base fed 1 - D / 2 (a
    similarity-calibrated loss) or sqrt(D) (a distance-calibrated one), D written out per pair;
    with a miner, the miner mines the same matrix."""
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

    from glassmetric.losses import IntrospectiveLoss

    s, u = batch(8)
    params = IntrospectiveParams(alpha_scale=3.0, beta_offset=2.0)
    D = _hand_distances(s, u, params).float()
    dummy = torch.zeros(len(s), 1)

    ours = IntrospectiveLoss(pml_losses.MultiSimilarityLoss(), params)(s, u, LABELS)
    ref = pml_losses.MultiSimilarityLoss()
    ref.distance = _fixed(CosineSimilarity, 1 - D / 2)
    assert float(ours) == pytest.approx(float(ref(dummy, LABELS)), rel=1e-4, abs=1e-6)

    mined = IntrospectiveLoss(pml_losses.MultiSimilarityLoss(), params, miner=pml_miners.MultiSimilarityMiner(0.1))
    ref_miner = pml_miners.MultiSimilarityMiner(0.1)
    ref_miner.distance = _fixed(CosineSimilarity, 1 - D / 2)
    expected = ref(dummy, LABELS, ref_miner(dummy, LABELS))
    assert float(mined(s, u, LABELS)) == pytest.approx(float(expected), rel=1e-4, abs=1e-6)

    ours = IntrospectiveLoss(pml_losses.ContrastiveLoss(), params)(s, u, LABELS)
    ref = pml_losses.ContrastiveLoss()
    ref.distance = _fixed(LpDistance, D.clamp(min=1e-12).sqrt())
    assert float(ours) == pytest.approx(float(ref(dummy, LABELS)), rel=1e-4, abs=1e-6)


def test_introspective_loss_with_proxies_matches_the_release_formula():
    from pytorch_metric_learning import losses as pml_losses

    from glassmetric.losses import IntrospectiveLoss

    s, u = batch(5)
    torch.manual_seed(0)
    base = pml_losses.ProxyAnchorLoss(NUM_CLASSES, DIM, margin=0.1, alpha=32.0)
    got = IntrospectiveLoss(base)(s, u, LABELS)
    assert float(got) == pytest.approx(proxyanchor_release_formula(s, u, base.proxies), rel=1e-4)
    with pytest.raises(ValueError, match="semantic"):
        IntrospectiveLoss(pml_losses.ContrastiveLoss())(s, u[:3], LABELS)
