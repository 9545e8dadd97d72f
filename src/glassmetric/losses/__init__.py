"""Losses: pytorch-metric-learning losses on the structural (DIML) and introspective (IDML)
similarities, the DGML grouped objective and its diversity term, and the losses chosen by name
from a config."""

from glassmetric.losses.introspective import IntrospectiveLoss
from glassmetric.losses.structural import StructuralLoss, StructuralSettings

__all__ = ["IntrospectiveLoss", "StructuralLoss", "StructuralSettings"]
