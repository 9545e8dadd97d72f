"""glassmetric: interpretable deep metric learning.

One pipeline (data -> backbone -> embedding heads -> similarity -> loss / retrieval ->
explanation) into which structural matching (DIML), attentive grouping (DGML) and
introspective similarity (IDML) plug.
"""

__version__ = "0.1.0"
