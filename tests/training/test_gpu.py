"""Every method trains and evaluates on CUDA, and gives the CPU's retrieval there (skipped without a GPU)."""

import pytest
import torch

from glassmetric.checkpoints import load_trained
from glassmetric.config import load_config
from glassmetric.data.synthetic import SyntheticParts
from glassmetric.data.transforms import build_transforms
from glassmetric.retrieval.evaluate import evaluate_model, evaluate_rerank_sweep
from glassmetric.retriever.model import InferenceModel
from glassmetric.training.fit import fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TINY = [
    "data.image_size=64",
    "data.resize=64",
    "data.num_workers=0",
    "data.synthetic.num_classes=12",
    "data.synthetic.images_per_class=4",
    "data.val_classes=0",
    "trainer.select=last",
    "trainer.max_epochs=1",
    "trainer.batch_size=8",
    "trainer.samples_per_class=2",
    "trainer.progress_bar=false",
    "model.embedding_dim=16",
    "trainer.accelerator=gpu",
]
METHODS = {
    "global": [],
    "structural": ["model.spatial_grid=2", "loss.similarity=structural"],
    "groups": ["model.groups=2"],
    "introspective": ["model.uncertainty_dim=8", "loss.similarity=introspective", "loss.mixup=true"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_on_cuda_and_evaluates_like_the_cpu(tmp_path, method):
    result = fit(load_config("demo_scratch", TINY + METHODS[method] + [f"trainer.output_dir={tmp_path}"]))
    assert result.test_metrics and all(0 <= v <= 1 for v in result.test_metrics.values())
    model, _ = load_trained(str(result.checkpoint))
    data = SyntheticParts(
        "test", num_classes=12, images_per_class=4, image_size=64, transform=build_transforms(False, 64, 64)
    )
    # float32 convolutions and Sinkhorn on another device: allow one near-tied query of the 24 to flip
    one_query = 1 / 24 + 1e-6
    cpu = evaluate_model(model, data, device="cpu")
    assert evaluate_model(model, data, device="cuda") == pytest.approx(cpu, abs=one_query)
    if method != "groups":
        view, kw = InferenceModel(model, grid=2), {"ks": (0, 5)}
        assert evaluate_rerank_sweep(view, data, device="cuda", **kw) == pytest.approx(
            evaluate_rerank_sweep(view, data, device="cpu", **kw), abs=one_query
        )
