"""Attentive grouping (DGML, Xu et al., arXiv 2011.08877): the grouping attention module.

On the last feature map f_p (C channels, p = 1 .. h*w positions):

    keys      k_p = W_k f_p + b_k            (1x1 conv, C -> C/8)
    values    v_p = W_v f_p + b_v            (1x1 conv, C -> D/k)
    attention a_ip = softmax_p(q_i . k_p)     (k learnable queries q_i; one distribution over
                                              the positions per group, summing to 1)
    group     o_i = normalise(sum_p a_ip v_p) (L2-normalised, D/k dims)

The retrieval embedding is the concatenation ``[o_1, ..., o_k] / sqrt(k)``: unit-norm, and its
cosine with another image's is the mean of the k per-group cosines, so ranking by it is
ranking by the sum of per-group cosines (the decomposition :mod:`glassmetric.explain.groups`
shows). Every step is per position or a sum over positions, so the group embeddings are
invariant to any permutation of the spatial positions, as the paper states.

The head replaces the global embedding (``embedding``) and adds ``group_embeddings``
(B, k, D/k) and ``attention`` (B, k, h, w) to the model's output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glassmetric.errors import ConfigError
from glassmetric.models.output import EmbeddingOutput


def check_groups(embedding_dim: int, groups: int) -> None:
    """ConfigError naming the key unless ``groups`` >= 1 divides ``embedding_dim``."""
    if int(groups) != groups or groups < 1:
        raise ConfigError(f"model.groups: expected a positive number of groups, got {groups!r}")
    if embedding_dim % groups:
        raise ConfigError(
            f"model.groups: model.embedding_dim = {embedding_dim} is not divisible by {groups} groups "
            f"(each group gets embedding_dim / groups dimensions; e.g. embedding_dim = {groups * max(1, embedding_dim // groups)})"
        )


class GroupingHead(nn.Module):
    """Feature map -> k attention groups: ``embedding``, ``group_embeddings``, ``attention``.

    Args:
        in_channels: C of the feature map.
        embedding_dim: D of the concatenated embedding (divisible by ``groups``).
        groups: k, the number of learnable queries.
        key_dim: size of keys and queries (default C / 8, as in the paper).
        query_std: standard deviation of the initial queries ``q_i ~ N(0, query_std^2)``. With a
            small value the logits ``q_i . k_p`` start near 0, so every group starts near average
            pooling (the pretrained feature's geometry) and specialises while training.
    """

    def __init__(
        self, in_channels: int, embedding_dim: int, groups: int = 3, key_dim: int | None = None, query_std: float = 1.0
    ):
        super().__init__()
        check_groups(embedding_dim, groups)
        self.groups = int(groups)
        self.group_dim = embedding_dim // self.groups
        self.key_dim = int(key_dim) if key_dim is not None else max(1, in_channels // 8)
        self.keys = nn.Conv2d(in_channels, self.key_dim, kernel_size=1)
        self.values = nn.Conv2d(in_channels, self.group_dim, kernel_size=1)
        if not query_std > 0:
            raise ConfigError(f"model.group_query_std: expected > 0, got {query_std}")
        self.queries = nn.Parameter(torch.randn(self.groups, self.key_dim) * float(query_std))

    def attend(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) -> (attention (B, k, h, w), un-normalised groups sum_p a_ip v_p (B, k, D/k))."""
        b, _, h, w = feature_map.shape
        keys = self.keys(feature_map).flatten(2)  # (B, C/8, hw)
        values = self.values(feature_map).flatten(2)  # (B, D/k, hw)
        logits = torch.einsum("kc,bcp->bkp", self.queries.to(keys.dtype), keys)
        attention = logits.float().softmax(dim=-1).to(values.dtype)  # over positions p
        groups = torch.einsum("bkp,bdp->bkd", attention, values)
        return attention.reshape(b, self.groups, h, w), groups

    def forward(self, feature_map: torch.Tensor, pooled: torch.Tensor, output: EmbeddingOutput) -> dict:
        attention, groups = self.attend(feature_map)
        group_embeddings = F.normalize(groups, dim=-1)
        embedding = group_embeddings.flatten(1) / math.sqrt(self.groups)
        return {"embedding": embedding, "group_embeddings": group_embeddings, "attention": attention}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Keys + values and the queries, which train with their own learning rates."""
        kv = [p for m in (self.keys, self.values) for p in m.parameters() if p.requires_grad]
        return {"kv": kv, "queries": [self.queries] if self.queries.requires_grad else []}

    def extra_repr(self) -> str:
        return f"groups={self.groups}, group_dim={self.group_dim}, key_dim={self.key_dim}"
