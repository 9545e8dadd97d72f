"""Explain why two image files were judged alike by a trained model (structural matching)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from glassmetric.config import Config
from glassmetric.data.base import open_image
from glassmetric.data.transforms import eval_geometry
from glassmetric.models.spatial_head import ensure_spatial_head
from glassmetric.similarity.structural import StructuralExplanation, explain_pair
from glassmetric.training.fit import eval_transform


@dataclass
class PairExplanation:
    images: tuple[Image.Image, Image.Image]  # as the model saw them (resized, centre-cropped)
    structural: StructuralExplanation


def model_view(cfg: Config, image: Image.Image) -> Image.Image:
    """The image as it enters the model, before normalisation: resize + centre crop."""
    return eval_geometry(cfg.data.eval_image_size or cfg.data.image_size, cfg.data.resize)(image)


@torch.inference_mode()
def explain_files(model: torch.nn.Module, cfg: Config, path_x: str | Path, path_y: str | Path) -> PairExplanation:
    """Embed two image files and decompose their structural similarity (training-free when the
    checkpoint has no spatial head: its global head is applied at every location)."""
    ensure_spatial_head(model, cfg.model.spatial_grid or 4)
    model.eval()
    raw = [open_image(path_x), open_image(path_y)]
    transform = eval_transform(cfg, model)
    device = next(model.parameters()).device
    out = model(torch.stack([transform(img) for img in raw]).to(device))
    s = cfg.structural
    explanation = explain_pair(
        out.local[0], out.local[1], out.embedding[0], out.embedding[1],
        epsilon=s.epsilon, iters=s.iters, marginals=s.marginals,
    )
    return PairExplanation(images=(model_view(cfg, raw[0]), model_view(cfg, raw[1])), structural=explanation)
