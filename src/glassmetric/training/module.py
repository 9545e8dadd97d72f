"""The LightningModule that trains an EmbeddingModel with a metric loss.

Training labels are mapped to contiguous indices (proxy losses and per-class betas index by
them); the mapping is a buffer, so it travels with the checkpoint. Validation embeds the
held-out validation classes and logs the retrieval metrics used for model selection.
"""

from __future__ import annotations

import math
from typing import cast

import lightning.pytorch as pl
import numpy as np
import torch

from glassmetric.checkpoints import METADATA_KEY, checkpoint_metadata
from glassmetric.config import Config
from glassmetric.factory import build_model_from_config, build_training_loss
from glassmetric.losses.grouped import GroupedLoss
from glassmetric.models.backbone_split import FrozenSplit
from glassmetric.models.embedding_model import EmbeddingModel
from glassmetric.retrieval.metrics import retrieval_metrics
from glassmetric.training.distributed import gather_batch, gather_unique, world


def mixup_loss(model: torch.nn.Module, loss_fn, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mixup terms of IDML (Wang et al. 2023, Sec. 3.4): with lambda ~ Beta(1, 1) and a
    random permutation pi of the batch, mix = lambda x + (1 - lambda) x_pi and the terms are
    lambda L(mix, y) + (1 - lambda) L(mix, y_pi). Drawn from torch's global RNG, which training
    reseeds every epoch, so resumed runs repeat them."""
    lam = float(torch.distributions.Beta(1.0, 1.0).sample())
    perm = torch.randperm(len(images), device=images.device)
    mixed = model(lam * images + (1.0 - lam) * images[perm])
    return lam * loss_fn(mixed, labels) + (1.0 - lam) * loss_fn(mixed, labels[perm])


class MetricLearner(pl.LightningModule):
    label_lookup: torch.Tensor  # a registered buffer: training class id -> contiguous index (-1: not a training class)

    def __init__(self, cfg: Config, train_class_ids: np.ndarray, model: torch.nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = model if model is not None else build_model_from_config(cfg)
        class_ids = np.asarray(sorted({int(c) for c in train_class_ids}), dtype=np.int64)
        lookup = torch.full((int(class_ids.max()) + 1,), -1, dtype=torch.long)
        lookup[torch.from_numpy(class_ids)] = torch.arange(len(class_ids))
        self.register_buffer("label_lookup", lookup)
        self.loss = build_training_loss(cfg, len(class_ids))
        self._val_outputs: list[
            tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        ] = []  # embeddings, labels, data set rows
        #: set when training runs on cached features (``trainer.cache_features``): the training
        #: batches then hold the frozen stages' output, and the model runs from there
        self.feature_split: FrozenSplit | None = None

    def forward(self, images: torch.Tensor):
        return self.model(images)

    def embed_training_inputs(self, inputs: torch.Tensor):
        """The model's output for a training batch: images, or with :attr:`feature_split` the
        cached output of the backbone's frozen stages."""
        if self.feature_split is None:
            return self.model(inputs)
        model = cast(EmbeddingModel, self.model)  # the split was made from its backbone
        return model.forward_feature_map(self.feature_split.rest(inputs.float()))

    def objective(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of a batch (contiguous class indices), and its parts to log: the
        grouped loss's terms, with the mixup terms added when ``loss.mixup`` is on. ``images``
        are cached features when :attr:`feature_split` is set."""
        output, all_labels = gather_batch(self.embed_training_inputs(images), labels)  # under DDP: the global batch
        terms: dict[str, torch.Tensor] = {}
        if isinstance(self.loss, GroupedLoss):
            terms = self.loss.terms(output, all_labels)
            loss = self.loss.combine(terms)
        else:
            loss = self.loss(output, all_labels)
        if self.cfg.loss.mixup:
            loss = loss + mixup_loss(self.model, lambda out, y: self.loss(*gather_batch(out, y)), images, labels)
        return loss, terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labels = self.label_lookup[batch["label"]]
        loss, terms = self.objective(batch["features"] if "features" in batch else batch["image"], labels)
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=len(labels))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        output = self.model(batch["image"])
        # the data set index of each row (IndexedDataset), to undo the DDP shards; else the order seen
        seen = sum(len(y) for _, y, _ in self._val_outputs)
        index = batch.get("index", torch.arange(seen, seen + len(batch["label"])))
        self._val_outputs.append((output.embedding.float().cpu(), batch["label"].cpu(), index.cpu()))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        parts = {
            "embedding": torch.cat([e for e, _, _ in self._val_outputs]),
            "label": torch.cat([y for _, y, _ in self._val_outputs]),
        }
        index = torch.cat([i for _, _, i in self._val_outputs])
        self._val_outputs.clear()
        # under DDP each rank embedded a shard: every rank gathers the whole split, in data set order
        parts = gather_unique(parts, index, drop_missing=True)  # skipped images are on no rank
        metrics = retrieval_metrics(
            parts["embedding"], parts["label"], recall_ks=(1, 2, 4, 8), include=("recall", "r_precision", "map_at_r")
        )
        for name, value in metrics.items():
            self.log(f"val/{name}", value, prog_bar=name == "recall@1", sync_dist=world()[0] > 1)

    def configure_optimizers(self):
        o = self.cfg.optim
        groups = []
        for name, params in self.model.parameter_groups().items():
            params = [p for p in params if p.requires_grad]
            if params:
                groups.append(
                    {
                        "params": params,
                        "lr": self._group_lr(name),
                        "weight_decay": self._group_decay(name),
                        "name": name,
                    }
                )
        loss_params = [p for p in self.loss.parameters() if p.requires_grad]
        if loss_params:
            lr = self.cfg.loss.lr or self.loss.learning_rate(o.lr)
            groups.append({"params": loss_params, "lr": lr, "name": "loss", "weight_decay": 0.0})
        if o.name == "adam":
            optimizer = torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay)
        elif o.name == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
        else:
            optimizer = torch.optim.SGD(groups, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
        factors = [self._lr_factor(group["name"]) for group in groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def _group_lr(self, name: str) -> float:
        """Backbone: optim.lr; grouping keys / values: optim.grouping_lr; grouping queries:
        optim.query_lr; other heads: optim.head_lr (each defaulting to the one before it)."""
        o = self.cfg.optim
        head = o.head_lr or o.lr
        if name == "backbone":
            return o.lr
        if name == "grouping.kv":
            return o.grouping_lr or head
        if name == "grouping.queries":
            return o.query_lr or o.grouping_lr or head
        return head

    def _group_decay(self, name: str) -> float:
        """optim.grouping_weight_decay for the grouping keys / values, optim.query_weight_decay
        for its queries (the DGML release decays them differently), else optim.weight_decay."""
        o = self.cfg.optim
        if name == "grouping.kv" and o.grouping_weight_decay is not None:
            return o.grouping_weight_decay
        if name == "grouping.queries" and o.query_weight_decay is not None:
            return o.query_weight_decay
        return o.weight_decay

    def _lr_factor(self, group: str):
        """Epoch -> learning-rate factor of a parameter group: the schedule (none, cosine over
        max_epochs, or step), times 0 for the backbone during the warm-up epochs, in which only
        the new layers (heads, loss parameters) learn."""
        o, epochs = self.cfg.optim, self.cfg.trainer.max_epochs

        def factor(epoch: int) -> float:
            if group == "backbone" and epoch < o.warmup_epochs:
                return 0.0
            if o.scheduler == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
            if o.scheduler == "step":
                return o.gamma ** (epoch // o.step_epochs)
            return 1.0

        return factor

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[METADATA_KEY] = checkpoint_metadata(self.cfg)
