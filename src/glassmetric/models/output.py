"""The record a model returns.

Every head adds its own field; callers read the fields they need and ignore the rest, so a new
head (spatial grid, groups, uncertainty) never changes an existing caller.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class EmbeddingOutput:
    """Outputs of :class:`glassmetric.models.EmbeddingModel` for a batch of B images.

    embedding:        (B, D) L2-normalised global embedding; retrieval ranks by its cosine.
    feature_map:      (B, C, h, w) unpooled last feature map of the backbone.
    pooled:           (B, C) pooled backbone feature that fed the global head.
    local:            (B, g*g, D) L2-normalised spatial embeddings (structural matching).
    group_embeddings: (B, k, D/k) L2-normalised per-group embeddings (attentive grouping).
    attention:        (B, k, h, w) attention map of each group (attentive grouping).
    uncertainty:      (B, Du) un-normalised uncertainty embedding (introspective similarity).
    """

    embedding: torch.Tensor
    feature_map: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    local: torch.Tensor | None = None
    group_embeddings: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    uncertainty: torch.Tensor | None = None

    def present(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def detach(self) -> EmbeddingOutput:
        return EmbeddingOutput(**{k: v.detach() for k, v in self.present().items()})
