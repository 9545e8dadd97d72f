"""glassmetric: interpretable deep metric learning.

One pipeline (data -> backbone -> embedding heads -> similarity -> loss / retrieval ->
explanation) into which structural matching (DIML), attentive grouping (DGML) and
introspective similarity (IDML) plug.

Inference goes through :class:`Retriever`::

    import glassmetric
    retriever = glassmetric.Retriever.from_checkpoint("runs/demo/checkpoints/best.ckpt")
    gallery = retriever.embed("images/")                # an Embeddings of every image
    result = retriever.rerank(gallery, k=10)            # structural re-ranking of the top 10
    pair = retriever.explain("a.jpg", "b.jpg")          # transport plan, contributions, ...

The public names load on first use, so ``import glassmetric`` is quick and inference never
imports the trainer (``fit`` does, when called).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {
    "Retriever": "glassmetric.retriever",
    "Embeddings": "glassmetric.retriever",
    "PairExplanation": "glassmetric.explain.pair",
    "OTSettings": "glassmetric.similarity.ot_settings",
    "Config": "glassmetric.config",
    "load_config": "glassmetric.config",
    "fit": "glassmetric.training.fit",
    "build_loss": "glassmetric.losses.metric_losses",
    "structural_similarity": "glassmetric.similarity.structural",
    "explain_pair": "glassmetric.similarity.structural",
    "GalleryIndex": "glassmetric.retrieval.index",
    "retrieval_metrics": "glassmetric.retrieval.metrics",
    "build_model_from_config": "glassmetric.factory",
    "load_trained": "glassmetric.checkpoints",
    "GlassmetricError": "glassmetric.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    """Import a public name's module on first use (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'glassmetric' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
