"""The optimal-transport settings of the structural similarity, in one object.

:class:`OTSettings` holds what every structural computation needs from the config (training
losses, re-ranking, explanations, the explorer): the entropic regularisation epsilon, the most
Sinkhorn iterations, the stopping tolerance on the marginal error, the marginals rule and the
gradient mode (Zhao et al. 2021, Sec. 3.2). :meth:`OTSettings.from_config` is the one place a
config's ``structural`` section becomes settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

if TYPE_CHECKING:  # config validates loss parameters through losses/, which build on these settings
    from glassmetric.config import Config, StructuralConfig

__all__ = ["GRADIENT_MODES", "MARGINALS", "OTSettings"]

MARGINALS = ("cross_correlation", "pooled_cross_correlation", "uniform")
GRADIENT_MODES = ("none_through_plan", "unrolled")


@dataclass(frozen=True)
class OTSettings:
    """Entropic OT of the structural similarity: ``min_T <T, 1 - S> - epsilon H(T)`` with
    marginals ``mu``, ``nu`` by log-domain Sinkhorn.

    Attributes:
        epsilon: entropic regularisation (> 0), in units of the cost ``1 - S``.
        iters: the most Sinkhorn iterations a problem gets (>= 1).
        tol: a problem stops once its L1 marginal error is at most ``tol``; None runs exactly
            ``iters`` iterations with no host synchronisation.
        marginals: ``cross_correlation`` (DIML), ``pooled_cross_correlation`` or ``uniform``.
        gradient: ``none_through_plan`` (the plan is a constant in the backward pass) or
            ``unrolled`` (back-propagate through every iteration).
    """

    epsilon: float = 0.05
    iters: int = 100
    tol: float | None = 1e-4
    marginals: Literal["cross_correlation", "pooled_cross_correlation", "uniform"] = "cross_correlation"
    gradient: Literal["none_through_plan", "unrolled"] = "none_through_plan"

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise ValueError(f"OTSettings.epsilon must be > 0, got {self.epsilon}")
        if not (isinstance(self.iters, int) and self.iters >= 1):
            raise ValueError(f"OTSettings.iters must be an integer >= 1, got {self.iters!r}")
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"OTSettings.tol must be > 0 or None, got {self.tol}")
        if self.marginals not in MARGINALS:
            raise ValueError(f"OTSettings.marginals must be one of {MARGINALS}, got {self.marginals!r}")
        if self.gradient not in GRADIENT_MODES:
            raise ValueError(f"OTSettings.gradient must be one of {GRADIENT_MODES}, got {self.gradient!r}")

    @classmethod
    def from_config(cls, cfg: Config | StructuralConfig) -> OTSettings:
        """The settings of a validated config (or its ``structural`` section; ``marginals:
        auto`` must have been resolved by :func:`glassmetric.config.validate`)."""
        s = cast("StructuralConfig", getattr(cfg, "structural", cfg))  # a Config's structural section, or the section
        if s.marginals == "auto":
            raise ValueError("structural.marginals 'auto' is resolved by glassmetric.config.validate first")
        return cls(
            epsilon=float(s.epsilon),
            iters=int(s.iters),
            tol=None if s.tol is None else float(s.tol),
            marginals=s.marginals,
            gradient=s.gradient,
        )
