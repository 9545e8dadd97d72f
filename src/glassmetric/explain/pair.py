"""Explain why two images were judged alike by a trained model: every explanation it supports.

:func:`explain_images` embeds the pair once and returns the structural decomposition (DIML;
training-free when the checkpoint has no spatial head), the per-group cosines and attention
(DGML, models with ``model.groups``) and the introspective scores (IDML, models with an
uncertainty head), each None when the model cannot give it. :func:`explain_files` reads the
two images from files; :func:`explain_views` takes them as the model sees them (:func:`model_view`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from glassmetric.config import Config
from glassmetric.data.image_io import open_image
from glassmetric.data.transforms import eval_geometry, normalisation
from glassmetric.explain.groups import GroupExplanation, explain_groups
from glassmetric.models.heads import GROUPING, SPATIAL
from glassmetric.models.spatial_head import ensure_spatial_head
from glassmetric.similarity.introspective import IntrospectiveParams, image_uncertainty, introspective_distance_matrix
from glassmetric.similarity.structural import StructuralExplanation, explain_pair
from glassmetric.training.module import introspective_params


@dataclass
class IntrospectiveScores:
    """IDML view of a pair: each image's uncertainty ||u|| and the pair's two distances."""

    uncertainty: tuple[float, float]
    semantic_distance: float  # alpha = ||s_x - s_y||^2
    introspective_distance: float  # D = alpha exp(-(b_s beta + b_0) / (a_s alpha + a_0))

    def describe(self) -> str:
        ux, uy = self.uncertainty
        return (f"uncertainty {ux:.3g} / {uy:.3g}; semantic distance {self.semantic_distance:.3f}, "
                f"introspective distance {self.introspective_distance:.3f}")


@dataclass
class PairExplanation:
    images: tuple[Image.Image, Image.Image]  # as the model saw them (resized, centre-cropped)
    #: None only for a grouping model without its own spatial head (see :func:`has_structural`)
    structural: StructuralExplanation | None
    #: present when the model has an uncertainty head (introspective similarity)
    introspective: IntrospectiveScores | None = None
    #: present when the model has attentive groups (model.groups)
    groups: GroupExplanation | None = None


def has_structural(model: torch.nn.Module) -> bool:
    """Can the model explain a pair structurally? Yes with a spatial head, or training-free
    (its global head at every location) unless attentive groups replaced that global head."""
    return SPATIAL in model.extra_heads or GROUPING not in model.extra_heads


def model_view(cfg: Config, image: Image.Image) -> Image.Image:
    """The image as it enters the model, before normalisation: resize + centre crop."""
    return eval_geometry(cfg.data.eval_image_size or cfg.data.image_size, cfg.data.resize)(image)


def explain_images(model: torch.nn.Module, cfg: Config, image_x: Image.Image, image_y: Image.Image) -> PairExplanation:
    """Embed two RGB images in one batch and explain their similarity in every way the model supports."""
    return explain_views(model, cfg, model_view(cfg, image_x), model_view(cfg, image_y))


@torch.inference_mode()
def explain_views(model: torch.nn.Module, cfg: Config, view_x: Image.Image, view_y: Image.Image) -> PairExplanation:
    """:func:`explain_images` of two images already in :func:`model_view` (resized, centre-cropped):
    the same explanation, as the evaluation transform is that geometry, then normalisation."""
    structural = has_structural(model)
    if structural:
        ensure_spatial_head(model, cfg.model.spatial_grid or 4)
    model.eval()
    normalise = normalisation(model.backbone.mean, model.backbone.std)
    device = next(model.parameters()).device
    out = model(torch.stack([normalise(img) for img in (view_x, view_y)]).to(device))
    explanation = None
    if structural:
        s = cfg.structural
        explanation = explain_pair(
            out.local[0], out.local[1], out.embedding[0], out.embedding[1],
            epsilon=s.epsilon, iters=s.iters, marginals=s.marginals,
        )
    intro = None
    if out.uncertainty is not None:
        intro = introspective_scores(out.embedding, out.uncertainty, introspective_params(cfg))
    groups = explain_groups(out, out, 0, 1) if out.group_embeddings is not None else None
    return PairExplanation(images=(view_x, view_y), structural=explanation, introspective=intro, groups=groups)


def explain_files(model: torch.nn.Module, cfg: Config, path_x: str | Path, path_y: str | Path) -> PairExplanation:
    """:func:`explain_images` of two image files; a ConfigError when the model has no
    structural explanation (a grouping model without its own spatial head)."""
    if not has_structural(model):
        ensure_spatial_head(model)  # raises the ConfigError that says how to train one
    return explain_images(model, cfg, open_image(path_x), open_image(path_y))


def introspective_scores(semantic: torch.Tensor, uncertainty: torch.Tensor, params: IntrospectiveParams) -> IntrospectiveScores:
    """The IDML scores of a pair from its (2, D) semantic and (2, Du) uncertainty embeddings."""
    s = torch.nn.functional.normalize(semantic.float(), dim=1)
    alpha = float((s[0] - s[1]).pow(2).sum())
    d = float(introspective_distance_matrix(s[:1], uncertainty[:1], s[1:], uncertainty[1:], params))
    u = image_uncertainty(uncertainty)
    return IntrospectiveScores(uncertainty=(float(u[0]), float(u[1])), semantic_distance=alpha, introspective_distance=d)
