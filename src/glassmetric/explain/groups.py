"""Why two images were judged alike by attentive grouping (DGML): the score as a sum over groups.

The retrieval embedding of a grouping model is ``[o_1, ..., o_k] / sqrt(k)`` with unit-norm
group embeddings o_i (:mod:`glassmetric.models.grouping_head`), so the cosine of two images is

    cos(e_x, e_y) = sum_i cos(o_i(x), o_i(y)) / k,

exactly: each group contributes its own cosine divided by k. :func:`explain_groups` returns the
per-group cosines, their contributions (which sum to the score) and each group's attention map
on both images, which shows what the group looked at.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glassmetric.errors import ConfigError
from glassmetric.models.output import EmbeddingOutput

__all__ = ["GroupExplanation", "explain_groups"]


@dataclass
class GroupExplanation:
    """One pair (x, y) decomposed over its k groups.

    group_similarity: (k,) cos(o_i(x), o_i(y)).
    contribution:     (k,) group_similarity / k; sums to ``score``.
    score:            () cosine of the two retrieval embeddings (what ranking uses).
    attention_x/_y:   (k, h, w) attention of each group on x / y (each map sums to 1).
    """

    group_similarity: torch.Tensor
    contribution: torch.Tensor
    score: torch.Tensor
    attention_x: torch.Tensor
    attention_y: torch.Tensor

    @property
    def groups(self) -> int:
        return int(self.group_similarity.numel())


def explain_groups(x: EmbeddingOutput, y: EmbeddingOutput, ix: int = 0, iy: int = 0) -> GroupExplanation:
    """Decompose the similarity of image ``ix`` of output ``x`` and image ``iy`` of output ``y``."""
    if x.group_embeddings is None or y.group_embeddings is None or x.attention is None or y.attention is None:
        raise ConfigError("explaining groups needs a model with attentive grouping (model.groups > 0)")
    gx, gy = x.group_embeddings[ix].double(), y.group_embeddings[iy].double()
    sim = (gx * gy).sum(-1)
    return GroupExplanation(
        group_similarity=sim,
        contribution=sim / len(sim),
        score=(x.embedding[ix].double() * y.embedding[iy].double()).sum(),
        attention_x=x.attention[ix].double(),
        attention_y=y.attention[iy].double(),
    )
