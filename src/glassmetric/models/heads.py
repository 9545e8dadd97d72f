"""The names of the extra heads an :class:`glassmetric.models.EmbeddingModel` can carry.

They are the keys of ``model.extra_heads`` and of the weights in a checkpoint
(``extra_heads.<name>.*``), so they are part of the checkpoint format.
"""

__all__ = ["GROUPING", "HEAD_NAMES", "SPATIAL", "UNCERTAINTY"]

#: attentive grouping (DGML): group embeddings and attention maps
GROUPING = "grouping"
#: the spatial grid of local embeddings (DIML)
SPATIAL = "spatial"
#: the uncertainty embedding (IDML)
UNCERTAINTY = "uncertainty"
HEAD_NAMES = (GROUPING, SPATIAL, UNCERTAINTY)
