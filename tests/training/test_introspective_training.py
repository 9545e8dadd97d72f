"""IDML training: the mixup terms, and short fits with the introspective distance."""

import pytest
import torch
from test_fit import tiny_config

from glassmetric.checkpoints import load_trained
from glassmetric.models.output import EmbeddingOutput
from glassmetric.training.fit import fit
from glassmetric.training.module import mixup_loss


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(12, 4)

    def forward(self, x):
        return EmbeddingOutput(embedding=torch.nn.functional.normalize(self.w(x.flatten(1)), dim=1))


def test_mixup_terms_follow_the_formula():
    """lambda L(mix, y) + (1 - lambda) L(mix, y_perm) with lambda ~ Beta(1, 1), mix = lambda x + (1 - lambda) x_perm."""
    model = _Linear()
    images, labels = torch.randn(6, 3, 2, 2), torch.tensor([0, 0, 1, 1, 2, 2])
    seen = []

    def loss_fn(output, y):
        seen.append((output.embedding.detach(), y.clone()))
        return (output.embedding.sum(1) * (y.float() + 1)).mean()

    torch.manual_seed(5)
    got = mixup_loss(model, loss_fn, images, labels)
    torch.manual_seed(5)
    lam = float(torch.distributions.Beta(1.0, 1.0).sample())
    perm = torch.randperm(6)
    mixed = model(lam * images + (1 - lam) * images[perm])
    expected = lam * loss_fn(mixed, labels) + (1 - lam) * loss_fn(mixed, labels[perm])
    assert 0 < lam < 1 and float(got) == pytest.approx(float(expected), rel=1e-6)
    assert torch.equal(seen[1][1], labels[perm]) and not torch.equal(perm, torch.arange(6))


@pytest.mark.parametrize("loss,mixup", [("proxyanchor", "true"), ("contrastive", "false")])
def test_introspective_fit_runs_and_reloads(tmp_path, loss, mixup):
    cfg = tiny_config(
        tmp_path,
        "trainer.max_epochs=1",
        f"loss.name={loss}",
        "loss.similarity=introspective",
        f"loss.mixup={mixup}",
        "model.uncertainty_dim=8",
        "model.pooling=avgmax",
    )
    result = fit(cfg)
    assert all(0.0 <= v <= 1.0 for v in result.test_metrics.values())
    model, _ = load_trained(str(result.checkpoint))
    out = model(torch.rand(2, 3, 64, 64))
    assert out.uncertainty.shape == (2, 8) and torch.isfinite(out.uncertainty).all()


def test_introspection_composes_with_attentive_groups(tmp_path):
    """Each group's semantic distance meets the image's uncertainty; the model carries both."""
    cfg = tiny_config(
        tmp_path,
        "trainer.max_epochs=1",
        "model.groups=3",
        "model.embedding_dim=18",
        "model.uncertainty_dim=6",
        "loss.similarity=introspective",
        "loss.mixup=true",
    )
    result = fit(cfg)
    assert all(0.0 <= v <= 1.0 for v in result.test_metrics.values())
    model, _ = load_trained(str(result.checkpoint))
    out = model(torch.rand(2, 3, 64, 64))
    assert out.group_embeddings.shape == (2, 3, 6) and out.uncertainty.shape == (2, 6)
