"""The DGML diversity loss (Xu et al., arXiv 2011.08877): the groups of one image should differ.

For each image, the embeddings f_i, f_j of every pair of two different groups (i < j) form a
negative pair of a binomial-deviance term (Yi et al. 2014):

    L_div = mean over images of  sum_{i<j} log(1 + exp(alpha (cos(f_i, f_j) - lambda))) / (k - 1)

with alpha = 50 and lambda = 0.5. Unordered pairs: each pair counts once (the term is symmetric
in i and j). This is the authors' release term for term (DGML-master ``criteria/diversity.py``,
``dirdiv_bd``: pairs i < j, the same image only, averaged over images, alpha = 2 x C = 2 x 25,
divided by k - 1). Computed batched over images, with no loop in Python.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: binomial-deviance scale alpha and margin lambda of the paper
ALPHA = 50.0
MARGIN = 0.5


def diversity_loss(group_embeddings: torch.Tensor, alpha: float = ALPHA, margin: float = MARGIN) -> torch.Tensor:
    """``(B, k, d)`` group embeddings -> the scalar diversity loss (0 for a single group)."""
    if group_embeddings.ndim != 3:
        raise ValueError(f"group_embeddings must be (B, k, d), got shape {tuple(group_embeddings.shape)}")
    b, k, _ = group_embeddings.shape
    if k < 2 or b == 0:
        return group_embeddings.sum() * 0.0
    f = F.normalize(group_embeddings.float(), dim=-1)
    cos = f @ f.transpose(1, 2)  # (B, k, k)
    i, j = torch.triu_indices(k, k, offset=1, device=f.device)
    terms = F.softplus(alpha * (cos[:, i, j] - margin))  # log(1 + exp(.)), stable
    return terms.sum(dim=1).mean() / (k - 1)
