"""The DGML training objective (Xu et al., arXiv 2011.08877): a metric loss on every group, plus diversity.

    L = 1/k sum_i L_metric(o_i) + w * L_div(o_1 .. o_k)   [+ L_structural]

Any pipeline loss is applied to each group's embedding o_i (B, D/k) on its own. Every group gets
its own loss instance, so losses with parameters (proxies of ProxyAnchor / ProxyNCA, the
per-class betas of the margin loss) have one set per group, in the group's own space; for
parameter-free losses the instances are identical. The diversity term is
:func:`glassmetric.losses.diversity.diversity_loss`. With ``loss.similarity`` structural or
multiscale (and a spatial head), the structural loss on the concatenated embedding and the local
grid is added, so structural matching is trained alongside the groups.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from glassmetric.errors import ConfigError
from glassmetric.losses.diversity import diversity_loss
from glassmetric.models.output import EmbeddingOutput

if TYPE_CHECKING:
    from glassmetric.losses.metric_losses import MetricLoss


class GroupedLoss(nn.Module):
    def __init__(
        self, per_group: list[MetricLoss], diversity_weight: float = 0.02, structural: nn.Module | None = None
    ):
        super().__init__()
        if not per_group:
            raise ConfigError("model.groups: the grouped loss needs at least one group")
        self.per_group = nn.ModuleList(per_group)
        self.diversity_weight = float(diversity_weight)
        self.structural = structural
        self.name = per_group[0].name

    @property
    def groups(self) -> int:
        return len(self.per_group)

    def terms(self, output: EmbeddingOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parts of the objective: ``metric`` (mean over groups), ``diversity``, ``structural``."""
        g = output.group_embeddings
        if g is None:
            raise ConfigError(
                "model.groups: the grouped loss needs group embeddings (a model built with model.groups > 0)"
            )
        if g.shape[1] != self.groups:
            raise ConfigError(f"model.groups: the loss has {self.groups} groups, the model gives {g.shape[1]}")
        metric = torch.stack(
            [
                loss(EmbeddingOutput(embedding=g[:, i], uncertainty=output.uncertainty), labels)
                for i, loss in enumerate(self.per_group)
            ]
        ).mean()
        out = {"metric": metric, "diversity": diversity_loss(g)}
        if self.structural is not None:
            out["structural"] = self.structural(output, labels)
        return out

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective from its :meth:`terms`."""
        total = terms["metric"] + self.diversity_weight * terms["diversity"]
        return total + terms["structural"] if "structural" in terms else total

    def forward(self, output: EmbeddingOutput, labels: torch.Tensor) -> torch.Tensor:
        return self.combine(self.terms(output, labels))

    def learning_rate(self, base_lr: float) -> float:
        return cast("MetricLoss", self.per_group[0]).learning_rate(base_lr)  # nn.ModuleList items are typed Module
