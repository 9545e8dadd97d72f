"""Reading image files that nobody curated: any mode to RGB, and bad files by policy.

:func:`decode_image` is the one way an image becomes pixels, whatever its source: a file
(:func:`open_image`, every data set, ``explain``) or uploaded bytes (the explorer). It reads
every mode Pillow knows into 8-bit RGB: palette and 1-bit images, grayscale, 16- and 32-bit
grayscale (scaled, not clipped), CMYK, and images with an alpha channel (composited over
white); the EXIF orientation is applied. An image it cannot read (not found, empty, not an
image, truncated) raises a :class:`DataError` naming the file; one refused from its header,
before decoding, raises :class:`ImageTooLarge`: more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``
(a possible decompression bomb) or a side more than :data:`MAX_ASPECT_RATIO` times the other
(evaluation scales the shorter side to ``data.resize``: the longer one would grow with it).

``data.on_bad_image`` decides what a data set does with such a file: ``error`` (the default)
raises, ``skip`` returns None for it, logged by file name; :func:`collate_readable` then
leaves it out of its batch and counts it in the batch's ``"skipped"`` entry.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import default_collate

from glassmetric.errors import DataError

log = logging.getLogger("glassmetric.data")

POLICIES = ("error", "skip")

#: the longest side an image may have, in multiples of its shorter side: evaluation resizes
#: the shorter side to ``data.resize`` (256 by default), so the resized image has at most
#: ``MAX_ASPECT_RATIO * data.resize**2`` pixels (6.6 million, 20 MB at 256)
MAX_ASPECT_RATIO = 100


class ImageTooLarge(DataError):
    """An image refused from its header, before decoding: too many pixels, or too elongated."""


#: Pillow modes whose samples exceed 8 bits, read through numpy and scaled to 0..255
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _WIDE_MODES:
        values = np.asarray(img, dtype=np.float64)
        finite = values[np.isfinite(values)]
        top = float(finite.max()) if finite.size else 0.0
        scale = 255.0 if img.mode == "F" and top <= 1.0 else (255.0 / 65535.0 if top <= 65535 else 255.0 / top)
        gray = np.clip(np.nan_to_num(values) * scale, 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _check_size(img: Image.Image, name: str, max_pixels: int | None) -> None:
    w, h = img.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and w * h > limit:
        raise ImageTooLarge(
            f"cannot read image {name}: {w}x{h} pixels is more than PIL.Image.MAX_IMAGE_PIXELS = {limit} "
            "(a decompression bomb?)"
        )
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLarge(
            f"cannot read image {name}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels} pixels"
        )
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ImageTooLarge(
            f"cannot read image {name}: {w}x{h} pixels, one side more than {MAX_ASPECT_RATIO} times the other "
            "(evaluation scales the shorter side to data.resize and the longer with it)"
        )


def decode_image(source: str | Path | bytes, name: str | None = None, *, max_pixels: int | None = None) -> Image.Image:
    """A file (a path) or an image's bytes as 8-bit RGB; ``name`` names it in errors (default:
    the path). The size is checked from the header before decoding: at most ``max_pixels``
    (and ``PIL.Image.MAX_IMAGE_PIXELS``) pixels, at most :data:`MAX_ASPECT_RATIO` : 1."""
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source)
    from_file = isinstance(stream, Path)
    name = str(source) if name is None and from_file else name or "image"
    try:
        with Image.open(stream) as img:
            _check_size(img, name, max_pixels)
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {name}") from e
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"cannot read image {name}: {e}") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not from_file and isinstance(e, UnidentifiedImageError):
            reason = "cannot identify image file"  # Pillow's message names the BytesIO object
        raise DataError(f"cannot read image {name}: {reason}") from e


def open_image(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB (:func:`decode_image`), with an error that names the file
    when it cannot be read."""
    return decode_image(Path(path))


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise DataError(f"on_bad_image: expected one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


def skip_bad(error: DataError) -> None:
    """Log a bad image skipped under ``on_bad_image: skip`` (the error names the file)."""
    log.warning("skipping an unreadable image (data.on_bad_image: skip): %s", error)


def collate_readable(samples: list) -> dict:
    """``default_collate`` of the samples that were read; the None of each skipped image is
    left out and counted in ``"skipped"`` (a batch of skipped images only holds just that)."""
    readable = [s for s in samples if s is not None]
    batch = default_collate(readable) if readable else {}
    batch["skipped"] = torch.tensor(len(samples) - len(readable))
    return batch


def collate_training(samples: list) -> dict | None:
    """:func:`collate_readable`, but None for a batch of skipped images only: Lightning skips
    such a step."""
    batch = collate_readable(samples)
    return batch if "label" in batch else None
