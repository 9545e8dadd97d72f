"""Explain why two images were judged alike by a trained model: every explanation it supports.

:func:`explain_images` embeds the pair once and returns the structural decomposition (DIML,
when the model's output carries ``local`` cells: its spatial head, or the training-free one of
:class:`glassmetric.retriever.model.InferenceModel`), the per-group cosines and attention
(DGML, models with ``model.groups``) and the introspective scores (IDML, models with an
uncertainty head), each None when the model cannot give it. :func:`explain_views` takes the
images as the model sees them (:func:`model_view`). :meth:`glassmetric.Retriever.explain` is
the front door.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from PIL import Image

from glassmetric.config import Config
from glassmetric.data.transforms import eval_geometry, normalisation
from glassmetric.explain.frames import FramedImage, framed
from glassmetric.explain.groups import GroupExplanation, explain_groups
from glassmetric.similarity.introspective import IntrospectiveParams, image_uncertainty, introspective_distance_matrix
from glassmetric.similarity.ot_settings import OTSettings
from glassmetric.similarity.structural import StructuralExplanation, explain_pair

if TYPE_CHECKING:
    from glassmetric.models.backbone import Backbone


@dataclass
class IntrospectiveScores:
    """IDML view of a pair: each image's uncertainty ||u|| and the pair's two distances."""

    uncertainty: tuple[float, float]
    semantic_distance: float  # alpha = ||s_x - s_y||^2
    introspective_distance: float  # D = alpha exp(-(b_s beta + b_0) / (a_s alpha + a_0))

    def describe(self) -> str:
        ux, uy = self.uncertainty
        return (
            f"uncertainty {ux:.3g} / {uy:.3g}; semantic distance {self.semantic_distance:.3f}, "
            f"introspective distance {self.introspective_distance:.3f}"
        )


@dataclass
class PairExplanation:
    images: tuple[Image.Image, Image.Image]  # as the model saw them (resized, centre-cropped)
    #: None when the model gives no local cells (a grouping model without its own spatial head)
    structural: StructuralExplanation | None
    #: present when the model has an uncertainty head (introspective similarity)
    introspective: IntrospectiveScores | None = None
    #: present when the model has attentive groups (model.groups)
    groups: GroupExplanation | None = None
    #: the original photos with the box the model's input covers (figures draw these when present)
    originals: tuple[FramedImage, FramedImage] | None = None


def model_view(cfg: Config, image: Image.Image) -> Image.Image:
    """The image as it enters the model, before normalisation: resize + centre crop."""
    return eval_geometry(cfg.data.eval_image_size or cfg.data.image_size, cfg.data.resize)(image)


def explain_images(
    model: torch.nn.Module,
    cfg: Config,
    image_x: Image.Image,
    image_y: Image.Image,
    *,
    introspective: IntrospectiveParams | None = None,
) -> PairExplanation:
    """Embed two RGB images in one batch and explain their similarity in every way the model supports."""
    return explain_views(
        model,
        cfg,
        model_view(cfg, image_x),
        model_view(cfg, image_y),
        introspective=introspective,
        originals=(framed(cfg, image_x), framed(cfg, image_y)),
    )


@torch.inference_mode()
def explain_views(
    model: torch.nn.Module,
    cfg: Config,
    view_x: Image.Image,
    view_y: Image.Image,
    *,
    introspective: IntrospectiveParams | None = None,
    originals: tuple[FramedImage, FramedImage] | None = None,
) -> PairExplanation:
    """:func:`explain_images` of two images already in :func:`model_view` (resized, centre-cropped):
    the same explanation, as the evaluation transform is that geometry, then normalisation.

    The structural decomposition uses the OT settings of ``cfg``
    (:meth:`~glassmetric.similarity.ot_settings.OTSettings.from_config`); ``introspective``, the
    parameters of the introspective distance, is needed when the model has an uncertainty head;
    ``originals`` (:func:`~glassmetric.explain.frames.framed` photos) are kept for the figures.
    """
    model.eval()
    backbone = cast(
        "Backbone", model.backbone
    )  # an EmbeddingModel's (or its inference view's); nn.Module's attributes are typed Tensor | Module
    normalise = normalisation(backbone.mean, backbone.std)
    device = next(model.parameters()).device
    out = model(torch.stack([normalise(img) for img in (view_x, view_y)]).to(device))
    explanation = None
    if out.local is not None:
        explanation = explain_pair(
            x_local=out.local[0],
            y_local=out.local[1],
            x_global=out.embedding[0],
            y_global=out.embedding[1],
            settings=OTSettings.from_config(cfg),
        )
    intro = None
    if out.uncertainty is not None:
        if introspective is None:
            raise ValueError("the model has an uncertainty head: pass introspective= (its IntrospectiveParams)")
        intro = introspective_scores(out.embedding, out.uncertainty, introspective)
    groups = explain_groups(out, out, 0, 1) if out.group_embeddings is not None else None
    return PairExplanation(
        images=(view_x, view_y), structural=explanation, introspective=intro, groups=groups, originals=originals
    )


def introspective_scores(
    semantic: torch.Tensor, uncertainty: torch.Tensor, params: IntrospectiveParams
) -> IntrospectiveScores:
    """The IDML scores of a pair from its (2, D) semantic and (2, Du) uncertainty embeddings."""
    s = torch.nn.functional.normalize(semantic.float(), dim=1)
    alpha = float((s[0] - s[1]).pow(2).sum())
    d = float(introspective_distance_matrix(s[:1], uncertainty[:1], s[1:], uncertainty[1:], params))
    u = image_uncertainty(uncertainty)
    return IntrospectiveScores(
        uncertainty=(float(u[0]), float(u[1])), semantic_distance=alpha, introspective_distance=d
    )
