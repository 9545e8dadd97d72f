"""Run by torchrun with 2 CPU processes (gloo) from test_distributed.py; rank 0 writes a JSON report.

The one-process references are computed first, before the process group exists (so no
collective runs in them). Training: each rank then takes its half of the same global batch;
the loss of the gathered batch is back-propagated and the gradients averaged over the ranks
(what DDP does), to compare with the gradients of the loss on the whole batch in one process.
Evaluation: :func:`distributed_embed` on an odd-sized data set (so the sampler pads one shard)
against one process's embeddings and metrics, also with an unreadable image under skip.
"""

import json
import sys

import numpy as np
import torch
import torch.distributed as dist

from glassmetric.config import load_config
from glassmetric.data.synthetic import SyntheticParts
from glassmetric.data.transforms import build_transforms
from glassmetric.errors import DataError
from glassmetric.retrieval.embed import embed_fields
from glassmetric.retrieval.metrics import retrieval_metrics
from glassmetric.training.distributed import distributed_embed, world
from glassmetric.training.module import MetricLearner

BASE = ["model.backbone=resnet18", "model.frozen_bn=true", "model.embedding_dim=16"]  # images are made here at 32 px
VARIANTS = {
    "multisimilarity": [],
    "structural_contrastive": ["model.spatial_grid=2", "loss.similarity=structural", "loss.name=contrastive"],
    "groups_proxyanchor": ["model.groups=2", "loss.name=proxyanchor"],
    "introspective": ["model.uncertainty_dim=8", "loss.similarity=introspective"],
}
CLASSES, M, GLOBAL_BATCH = 4, 4, 16


def gradients(learner: MetricLearner, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict]:
    learner.zero_grad()
    loss, _ = learner.objective(images, labels)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}


def batch():
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return images, torch.arange(CLASSES).repeat_interleave(M)


def learners():
    for name, extra in VARIANTS.items():
        torch.manual_seed(1)
        yield name, MetricLearner(load_config("demo_scratch", BASE + extra), np.arange(CLASSES))


def training_references() -> dict:
    images, labels = batch()
    return {name: gradients(learner, images, labels) for name, learner in learners()}


def check_training(rank: int, size: int, references: dict) -> dict:
    report = {}
    images, labels = batch()
    shard = slice(rank * GLOBAL_BATCH // size, (rank + 1) * GLOBAL_BATCH // size)
    for name, learner in learners():
        loss, grads = gradients(learner, images[shard], labels[shard])
        for g in grads.values():  # DDP's reduction: the mean over the ranks
            dist.all_reduce(g)
            g /= size
        ref_loss, ref_grads = references[name]
        scale = max(float(g.abs().max()) for g in ref_grads.values())
        report[name] = {
            "loss": loss,
            "reference_loss": ref_loss,
            "same_parameters": sorted(grads) == sorted(ref_grads),
            "max_grad_diff": max(float((grads[n] - ref_grads[n]).abs().max()) for n in ref_grads) / scale,
        }
    return report


def evaluation_setup():
    torch.manual_seed(3)
    learner = MetricLearner(load_config("demo_scratch", BASE), np.arange(CLASSES))
    data = SyntheticParts(
        "test", num_classes=8, images_per_class=6, image_size=64, transform=build_transforms(False, 32, 32)
    )
    data = torch.utils.data.Subset(data, range(23))  # odd: DistributedSampler pads a shard
    return learner.model, data, {"fields": ("embedding",), "batch_size": 5, "device": "cpu"}


class WithABadImage(SyntheticParts):
    """Image 7 unreadable (read under data.on_bad_image: skip)."""

    def load(self, i):
        if i == 7:
            raise DataError("cannot read image bad seven.png: truncated")
        return super().load(i)


def skip_setup():
    model, _, kw = evaluation_setup()
    data = WithABadImage(
        "test", num_classes=8, images_per_class=6, image_size=64, transform=build_transforms(False, 32, 32)
    ).set_bad_image_policy("skip")
    return model, torch.utils.data.Subset(data, range(23)), kw


def check_evaluation(reference: dict, skip_reference: dict) -> dict:
    model, data, kw = evaluation_setup()
    shared = distributed_embed(model, data, **kw)
    model, data, kw = skip_setup()
    skipped = distributed_embed(model, data, **kw)
    return {
        "rows": len(shared["embedding"]),
        "max_embedding_diff": float((shared["embedding"] - reference["embedding"]).abs().max()),
        "same_labels": bool(torch.equal(shared["labels"], reference["labels"])),
        "metrics": retrieval_metrics(shared["embedding"], shared["labels"]),
        "reference_metrics": retrieval_metrics(reference["embedding"], reference["labels"]),
        # an unreadable image under skip: left out on every rank, the rest in data-set order
        "skip_rows": len(skipped["embedding"]),
        "skip_index": skipped["index"].tolist(),
        "skip_reference_index": skip_reference["index"].tolist(),
        "skip_max_embedding_diff": float((skipped["embedding"] - skip_reference["embedding"]).abs().max()),
    }


def main(out: str) -> None:
    torch.set_num_threads(1)
    assert world() == (1, 0)
    references = training_references()
    model, data, kw = evaluation_setup()
    eval_reference = embed_fields(model, data, **kw)
    model, data, kw = skip_setup()
    skip_reference = embed_fields(model, data, **kw)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    assert world() == (size, rank)
    report = {
        "world_size": size,
        "training": check_training(rank, size, references),
        "evaluation": check_evaluation(eval_reference, skip_reference),
    }
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
