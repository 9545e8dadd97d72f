"""Inference: :class:`Retriever` (load, embed, search, re-rank, explain, evaluate) and the
:class:`Embeddings` it returns."""

from glassmetric.retriever.embeddings import Embeddings
from glassmetric.retriever.model import InferenceModel
from glassmetric.retriever.retriever import Retriever

__all__ = ["Embeddings", "InferenceModel", "Retriever"]
