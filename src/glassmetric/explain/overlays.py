"""Values of the model's cell grid drawn over a photo, readable at a glance.

A value map is shaded with a perceptually uniform colour map whose opacity grows with the value
(:func:`alpha_ramp`): a cell of value 0 leaves the photo untouched, the largest value is the
most opaque, so nothing tints the whole photo. Photos are drawn at their own resolution, and the
grid is laid over the box the model's input covers (:class:`~glassmetric.explain.frames.FramedImage`).
Each figure carries one colour bar per quantity and a one-line "how to read this" caption
(:func:`add_caption`, a Text with gid :data:`CAPTION_GID`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import Colormap, ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from glassmetric.explain.frames import FramedImage

__all__ = [
    "ALPHA_MAX",
    "CAPTION_GID",
    "Picture",
    "add_caption",
    "alpha_ramp",
    "as_image",
    "draw_picture",
    "picture",
    "shade",
]

#: gid of the "how to read this" line under every figure
CAPTION_GID = "how-to-read"
#: opacity of the largest value of an overlay
ALPHA_MAX = 0.72


def alpha_ramp(name: str, alpha_max: float = ALPHA_MAX, gamma: float = 2.0, n: int = 256) -> Colormap:
    """The Matplotlib colour map ``name`` with an opacity ``alpha_max * t ** gamma`` at scale
    position ``t`` in [0, 1]: transparent at the bottom, rising with the value, so middling values
    stay light and only the largest stand out; values under the scale and NaN are transparent."""
    t = np.linspace(0.0, 1.0, n)
    colours = matplotlib.colormaps[name](t)
    colours[:, 3] = alpha_max * t**gamma
    clear = (0.0, 0.0, 0.0, 0.0)
    return ListedColormap(colours, name=f"{name}+alpha").with_extremes(under=clear, bad=clear)


def as_image(image, name: str) -> np.ndarray:
    """PIL image or HxW / HxWx3 / HxWx4 array (uint8, or float in [0, 1]) -> array for imshow."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return arr
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=-1)
    raise ValueError(f"{name} must be a PIL image or an HxWx3 array, got shape {arr.shape}")


@dataclass(frozen=True)
class Picture:
    """A photo as drawn: its pixels and the box ``(left, top, right, bottom)`` the grid covers."""

    pixels: np.ndarray
    box: tuple[float, float, float, float]

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def cropped(self) -> bool:
        """Whether the model saw less than the whole photo."""
        left, top, right, bottom = self.box
        return left > 0.5 or top > 0.5 or right < self.width - 0.5 or bottom < self.height - 0.5


def picture(image, name: str) -> Picture:
    """A :class:`~glassmetric.explain.frames.FramedImage` (the original photo and its crop box) or
    an image as the model saw it (the grid covers all of it)."""
    if isinstance(image, FramedImage):
        return Picture(as_image(image.image, name), tuple(float(v) for v in image.box))  # type: ignore[arg-type]
    pixels = as_image(image, name)
    return Picture(pixels, (0.0, 0.0, float(pixels.shape[1]), float(pixels.shape[0])))


def shade(
    ax,
    values: np.ndarray,
    extent: tuple[float, float, float, float],
    cmap: Colormap,
    norm: Normalize,
    *,
    smooth: bool = False,
    gid: str | None = None,
) -> AxesImage:
    """Draw the ``(g, g)`` ``values`` over ``extent`` (left, right, bottom, top) with an alpha-ramp map."""
    kw: dict[str, Any] = {"interpolation": "bilinear" if smooth else "nearest", "zorder": 2}
    im = ax.imshow(np.asarray(values, dtype=np.float64), extent=extent, cmap=cmap, norm=norm, **kw)
    if gid is not None:
        im.set_gid(gid)
    return im


def draw_picture(ax, pic: Picture, extent: tuple[float, float, float, float], scale: float, x0: float = 0.0):
    """Draw ``pic`` over ``extent`` and, when the model saw only part of it, a dashed frame
    around that part (``scale``: drawn units per photo pixel, ``x0``: drawn left edge)."""
    ax.imshow(pic.pixels, extent=extent, interpolation="antialiased", zorder=1)
    if pic.cropped:
        left, top, right, bottom = pic.box
        ax.add_patch(
            Rectangle(
                (x0 + left * scale, top * scale),
                (right - left) * scale,
                (bottom - top) * scale,
                fill=False,
                ls="--",
                lw=1.2,
                ec="white",
                zorder=3,
            )
        )


def add_caption(fig: Figure, text: str) -> None:
    """The one-line "how to read this" under the figure."""
    label = fig.supxlabel(f"How to read this: {text}", fontsize=10, color="0.2", wrap=True)
    label.set_gid(CAPTION_GID)
