"""Similarities between embeddings: structural matching of DIML (batched log-domain Sinkhorn,
cross-correlation marginals, structural similarity and its decomposition, the OT settings in
one :class:`OTSettings`)."""

from glassmetric.similarity.ot_settings import OTSettings
from glassmetric.similarity.sinkhorn import KERNEL_RANGE_LIMIT, marginal_error, sinkhorn
from glassmetric.similarity.structural import (
    MIN_MASS,
    StructuralExplanation,
    check_normalised,
    compute_marginals,
    cross_correlation_marginals,
    explain_pair,
    global_similarity,
    local_similarity,
    multiscale_score,
    structural_similarity,
    structural_similarity_matrix,
    uniform_marginals,
)

__all__ = [
    "KERNEL_RANGE_LIMIT",
    "MIN_MASS",
    "OTSettings",
    "StructuralExplanation",
    "check_normalised",
    "compute_marginals",
    "cross_correlation_marginals",
    "explain_pair",
    "global_similarity",
    "local_similarity",
    "marginal_error",
    "multiscale_score",
    "sinkhorn",
    "structural_similarity",
    "structural_similarity_matrix",
    "uniform_marginals",
]
