"""The config -> object factory: the model, the training loss, transforms, data splits and the
recall cut-offs that a config describes. Inference (:mod:`glassmetric.retriever`) and training
(:mod:`glassmetric.training`) build everything through it.
"""

from __future__ import annotations

import torch

from glassmetric.config import Config
from glassmetric.data.registry import Splits, build_splits
from glassmetric.data.transforms import build_transforms
from glassmetric.losses.grouped import GroupedLoss
from glassmetric.losses.metric_losses import build_loss
from glassmetric.losses.structural import StructuralSettings
from glassmetric.models import build_model
from glassmetric.models.backbone import HasBackbone
from glassmetric.models.embedding_model import EmbeddingModel
from glassmetric.models.grouping_head import GroupingHead
from glassmetric.models.heads import GROUPING, SPATIAL, UNCERTAINTY
from glassmetric.models.introspective_head import UncertaintyHead
from glassmetric.models.spatial_head import SpatialGridHead
from glassmetric.retrieval.metrics import recall_ks_for
from glassmetric.similarity.introspective import IntrospectiveParams
from glassmetric.similarity.ot_settings import OTSettings

__all__ = [
    "build_model_from_config",
    "build_training_loss",
    "eval_transform",
    "evaluation_recall_ks",
    "introspective_params",
    "make_splits",
    "structural_settings",
    "train_transform",
]


def build_model_from_config(cfg: Config) -> EmbeddingModel:
    """The :class:`~glassmetric.models.EmbeddingModel` of ``cfg.model``: backbone, global head and
    the extra heads it asks for (grouping, spatial grid, uncertainty), initialised, not trained."""
    m = cfg.model
    model = build_model(
        m.backbone,
        m.embedding_dim,
        pretrained=m.pretrained,
        frozen_bn=m.frozen_bn,
        pooling=m.pooling,
        head_init=m.head_init,
    )
    if m.trainable_backbone is not None:
        model.backbone.freeze_except(m.trainable_backbone)
    if m.groups:
        model.add_head(
            GROUPING, GroupingHead(model.backbone.out_channels, m.embedding_dim, m.groups, query_std=m.group_query_std)
        )
    if m.spatial_grid:
        head = (
            SpatialGridHead.sharing(model.head, m.spatial_grid)
            if m.spatial_head == "shared"
            else SpatialGridHead(model.backbone.out_channels, m.embedding_dim, m.spatial_grid)
        )
        model.add_head(SPATIAL, head)
    if m.uncertainty_dim:
        model.add_head(UNCERTAINTY, UncertaintyHead(model.backbone.out_channels, m.uncertainty_dim))
    return model


def introspective_params(cfg: Config) -> IntrospectiveParams:
    """The offsets and scales of the introspective distance (``cfg.introspective``)."""
    i = cfg.introspective
    return IntrospectiveParams(i.alpha_scale, i.alpha_offset, i.beta_scale, i.beta_offset)


def structural_settings(cfg: Config, chunk_size: int | None = 32) -> StructuralSettings:
    """The structural loss's settings: the OT settings of :meth:`OTSettings.from_config`, and
    whether the loss compares by the multi-scale score."""
    return StructuralSettings(
        ot=OTSettings.from_config(cfg),
        multiscale=cfg.loss.similarity == "multiscale",
        chunk_size=chunk_size,
    )


def build_training_loss(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The loss of ``cfg``: the chosen metric loss (on the global, structural or introspective
    similarity), or with ``model.groups`` the DGML objective (that loss on every group + the
    diversity loss, :class:`GroupedLoss`)."""
    loss_cfg, m = cfg.loss, cfg.model
    structural = structural_settings(cfg) if loss_cfg.similarity in ("structural", "multiscale") else None
    introspective = introspective_params(cfg) if loss_cfg.similarity == "introspective" else None

    def make(dim: int, structural_settings_=None):
        return build_loss(
            loss_cfg.name,
            embedding_dim=dim,
            num_classes=num_classes,
            params=loss_cfg.params,
            miner_params=loss_cfg.miner_params,
            structural=structural_settings_,
            introspective_params=introspective,
        )

    if not m.groups:
        return make(m.embedding_dim, structural)
    # with introspection, each group's semantic distance meets the image's uncertainty
    per_group = [make(m.embedding_dim // m.groups) for _ in range(m.groups)]
    return GroupedLoss(per_group, loss_cfg.diversity_weight, make(m.embedding_dim, structural) if structural else None)


def eval_transform(cfg: Config, model: HasBackbone):
    """Resize + centre crop at the evaluation size, normalised as the backbone expects."""
    d = cfg.data
    return build_transforms(
        False, d.eval_image_size or d.image_size, d.resize, mean=model.backbone.mean, std=model.backbone.std
    )


def train_transform(cfg: Config, model: HasBackbone):
    """Random resized crop + flip at the training size, normalised as the backbone expects."""
    d = cfg.data
    return build_transforms(
        True, d.image_size, mean=model.backbone.mean, std=model.backbone.std, crop_scale=d.crop_scale
    )


def make_splits(cfg: Config, model: HasBackbone) -> Splits:
    """The train / val / test splits (and cross-domain gallery) of ``cfg.data``, with the
    training transform on the training split and the evaluation transform on the others."""
    return build_splits(cfg.data, train_transform(cfg, model), eval_transform(cfg, model), seed=cfg.seed)


def evaluation_recall_ks(cfg: Config) -> tuple[int, ...]:
    """The R@K cut-offs reported for ``cfg``: ``eval.recall_ks``, else the data set's usual ones."""
    return tuple(cfg.eval.recall_ks) if cfg.eval.recall_ks else recall_ks_for(cfg.data.name)
