"""Backbones, embedding heads and the model that combines them."""

from glassmetric.models.backbone import IMAGENET_MEAN, IMAGENET_STD, Backbone
from glassmetric.models.backbones import BACKBONES, TORCHVISION_BACKBONES, build_backbone
from glassmetric.models.embedding_model import EmbeddingModel, build_model
from glassmetric.models.global_head import POOLINGS, GlobalHead, gem_pool
from glassmetric.models.output import EmbeddingOutput
from glassmetric.models.spatial_head import feature_map_to_grid

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "POOLINGS",
    "TORCHVISION_BACKBONES",
    "Backbone",
    "EmbeddingModel",
    "EmbeddingOutput",
    "GlobalHead",
    "build_backbone",
    "build_model",
    "feature_map_to_grid",
    "gem_pool",
]
