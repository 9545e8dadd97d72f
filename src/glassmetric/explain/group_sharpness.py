"""How sharp the attention groups of a DGML model are: how many feature-map positions each group looks at.

Two counts per attention map ``a`` (``h * w`` positions, normalised to sum to 1):

* Mass count (:func:`mass_positions`): the smallest number of positions whose attention adds up
  to at least ``mass`` (default 90%) of the map, i.e. the top positions taken largest first.
  1 for a one-position map, ``ceil(mass * h * w)`` for a uniform one (average pooling).
* Effective count: the perplexity ``exp(-sum_p a_p log a_p)``
  (:func:`glassmetric.explain.group_parts.attention_spread`), 1 to ``h * w``.

A group is sharp when its mass count, averaged over images, is at most ``sharp`` positions
(default 10 of the 49 of a 7 x 7 map); :func:`group_sharpness` reports every group and whether
all of them are.
"""

from __future__ import annotations

from torch import Tensor

from glassmetric.explain.group_parts import attention_spread

__all__ = ["group_sharpness", "mass_positions"]

#: rounding slack when a cumulative sum reaches the mass exactly (0.6 + 0.3 < 0.9 in floating point)
_SLACK = 1e-9


def mass_positions(attention: Tensor, mass: float = 0.9) -> Tensor:
    """``(N, k, h, w)`` attention -> ``(N, k)`` int64: the fewest positions holding ``mass`` of each map."""
    if attention.ndim != 4:
        raise ValueError(f"attention must be (N, k, h, w), got shape {tuple(attention.shape)}")
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    a = attention.double().flatten(2)
    a = a / a.sum(-1, keepdim=True).clamp(min=1e-300)
    cumulative = a.sort(dim=-1, descending=True).values.cumsum(-1)
    return (cumulative < mass - _SLACK).sum(-1) + 1


def group_sharpness(attention: Tensor, mass: float = 0.9, sharp: float = 10.0) -> dict:
    """Sharpness of every group over ``(N, k, h, w)`` attention maps.

    Returns ``positions`` (h * w), ``mass``, ``sharp``; ``groups``: per group (1-based)
    ``mass_positions`` (mean :func:`mass_positions`), ``effective_positions`` (mean perplexity)
    and ``sharp_share`` (share of the images where the group's mass count is at most ``sharp``);
    ``widest`` (the largest mean mass count of a group) and ``all_sharp`` (``widest <= sharp``).
    """
    counts = mass_positions(attention, mass).double()
    spread = attention_spread(attention)
    groups = {
        str(i + 1): {
            "mass_positions": counts[:, i].mean().item(),
            "effective_positions": spread[:, i].mean().item(),
            "sharp_share": (counts[:, i] <= sharp).double().mean().item(),
        }
        for i in range(attention.shape[1])
    }
    widest = max(g["mass_positions"] for g in groups.values())
    return {
        "positions": attention.shape[2] * attention.shape[3],
        "mass": mass,
        "sharp": sharp,
        "groups": groups,
        "widest": widest,
        "all_sharp": bool(widest <= sharp),
    }
