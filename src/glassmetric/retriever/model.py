"""A trained :class:`glassmetric.models.EmbeddingModel` as inference sees it: which fields it
gives, decided once, and the training-free local embeddings of structural matching.

A model without a spatial head still gives ``local`` cells (DIML, Zhao et al. 2021, Sec. 3.5):
its global head's linear layer applied at every location of the feature map,
``x_i = normalise(pool_g(W f_p + b))_i``, computed by a :class:`SpatialGridHead` that shares
the global head and lives in this view, not in the model (the model is never changed). A model
with attentive groups has no trained global head, so it gives local cells only from its own
spatial head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from glassmetric.errors import ConfigError
from glassmetric.models.heads import GROUPING, SPATIAL, UNCERTAINTY
from glassmetric.models.output import EmbeddingOutput
from glassmetric.models.spatial_head import SpatialGridHead

if TYPE_CHECKING:
    from glassmetric.models.backbone import Backbone
    from glassmetric.models.embedding_model import EmbeddingModel
    from glassmetric.models.global_head import GlobalHead

__all__ = ["NO_LOCAL_FOR_GROUPS", "InferenceModel"]

#: why a grouping model without its own spatial head has no structural matching, and the fix
NO_LOCAL_FOR_GROUPS = (
    "structural matching on a model.groups checkpoint needs its own trained spatial head: "
    "train with model.spatial_grid=4 model.spatial_head=own loss.similarity=structural"
)


class InferenceModel(nn.Module):
    """Images -> :class:`EmbeddingOutput` of ``model``, with ``local`` set whenever the model
    can give it (its spatial head, or the training-free one of ``grid x grid`` cells).

    ``fields`` names the output fields it gives: ``embedding`` always; ``local``;
    ``group_embeddings`` and ``attention`` (attentive grouping); ``uncertainty`` (IDML).
    """

    def __init__(self, model: EmbeddingModel, grid: int = 4):
        super().__init__()
        self.model = model
        heads = model.extra_heads
        self._free: tuple[SpatialGridHead, ...]
        if SPATIAL not in heads and GROUPING not in heads:
            # kept in a tuple: not a submodule, so the view adds no weights and no head to anything
            self._free = (SpatialGridHead.sharing(model.head, grid),)
            self.training_free_local = True
        else:
            self._free = ()
            self.training_free_local = False
        fields = ["embedding"]
        if SPATIAL in heads or self._free:
            fields.append("local")
        if GROUPING in heads:
            fields += ["group_embeddings", "attention"]
        if UNCERTAINTY in heads:
            fields.append("uncertainty")
        self.fields: tuple[str, ...] = tuple(fields)

    @property
    def has_local(self) -> bool:
        return "local" in self.fields

    def require_local(self) -> None:
        """ConfigError, saying how to get one, when the model gives no local cells."""
        if not self.has_local:
            raise ConfigError(NO_LOCAL_FOR_GROUPS)

    # the parts of the wrapped model that callers read
    @property
    def backbone(self) -> Backbone:
        return self.model.backbone

    @property
    def head(self) -> GlobalHead:
        return self.model.head

    @property
    def extra_heads(self) -> nn.ModuleDict:
        return self.model.extra_heads

    @property
    def embedding_dim(self) -> int:
        return self.model.embedding_dim

    def forward(self, images: torch.Tensor) -> EmbeddingOutput:
        out = self.model(images)
        if self._free and out.local is None:
            out.local = self._free[0](out.feature_map, out.pooled, out)["local"]
        return out
