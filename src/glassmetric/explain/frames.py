"""Where the model's input lies in the original photo, so figures can draw the photo at its own
resolution and map the model's cell grid onto it.

The evaluation geometry is ``Resize(resize)`` of the shorter side, then ``CenterCrop(crop)``
(:func:`glassmetric.data.transforms.eval_geometry`). Inverted, the crop is the box

    left = offset_x * W / W',  right = (offset_x + crop) * W / W'   (the same for y with H, H'),

in the original's pixels, where ``W' x H'`` is the resized size and ``offset_x`` the pixels the
centre crop removes on the left (negative where it pads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from glassmetric.data.transforms import default_resize
from glassmetric.explain.correspondence import _crop_offset, resized_size

if TYPE_CHECKING:
    from glassmetric.config import Config

__all__ = ["FramedImage", "crop_box", "framed"]


@dataclass(frozen=True)
class FramedImage:
    """An original photo and the box ``(left, top, right, bottom)``, in its pixels, that the
    model's square input covers (the cell grid is laid over that box)."""

    image: Image.Image
    box: tuple[float, float, float, float]


def crop_box(size: tuple[int, int], crop: int, resize: int | None = None) -> tuple[float, float, float, float]:
    """The box of an image of ``size = (W, H)`` that ``Resize(resize)`` + ``CenterCrop(crop)`` keeps,
    in the original's pixels (it reaches outside the image where the crop pads)."""
    resize = default_resize(crop) if resize is None else resize
    w, h = size
    new_w, new_h = resized_size((w, h), resize)
    ox, oy = _crop_offset(new_w, crop), _crop_offset(new_h, crop)
    sx, sy = w / new_w, h / new_h
    return (ox * sx, oy * sy, (ox + crop) * sx, (oy + crop) * sy)


def framed(cfg: Config, image: Image.Image) -> FramedImage:
    """``image`` with the box the evaluation geometry of ``cfg`` crops from it."""
    crop = cfg.data.eval_image_size or cfg.data.image_size
    return FramedImage(image.convert("RGB"), crop_box(image.size, crop, cfg.data.resize))
