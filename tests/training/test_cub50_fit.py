"""A short fit of the cub50 preset on the real birds (../shared/data/cub50), end to end."""

import pytest
import torch

from glassmetric.config import load_config
from glassmetric.factory import build_model_from_config, make_splits
from glassmetric.models.output import EmbeddingOutput
from glassmetric.retrieval.evaluate import evaluate_model
from glassmetric.training.fit import fit

pytestmark = pytest.mark.realdata


class _PooledFeature(torch.nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images):
        return EmbeddingOutput(embedding=torch.nn.functional.normalize(self.backbone(images).mean((2, 3)), dim=1))


def test_short_cub50_fit_starts_from_the_pretrained_geometry(cub50_root, tmp_path):
    cfg = load_config(
        "cub50",
        [
            f"data.root={cub50_root}",
            "data.train_classes=[1, 4]",
            "data.test_classes=[26, 28]",
            "data.val_classes=1",
            "data.image_size=96",
            "data.eval_image_size=96",
            "data.resize=110",
            "data.num_workers=0",
            "trainer.max_epochs=1",
            "trainer.batch_size=12",
            "trainer.samples_per_class=4",
            "trainer.progress_bar=false",
            "eval.batch_size=32",
            f"trainer.output_dir={tmp_path}",
        ],
    )
    result = fit(cfg, baseline=True)
    assert result.checkpoint.is_file() and all(0 <= v <= 1 for v in result.test_metrics.values())
    # the identity head: before training, the embedding is the pooled ImageNet feature itself
    model = build_model_from_config(cfg)
    reference = evaluate_model(
        _PooledFeature(model.backbone), make_splits(cfg, model).test, device="cpu", batch_size=32
    )
    for key in ("recall@1", "r_precision", "map_at_r"):
        assert result.baseline_metrics[key] == pytest.approx(reference[key], abs=1e-6)
