"""Reading image files that nobody curated: any mode to RGB, and bad files by policy.

``open_image`` reads every mode Pillow knows into 8-bit RGB: palette and 1-bit images,
grayscale, 16- and 32-bit grayscale (scaled, not clipped), CMYK, and images with an alpha
channel (composited over white); the EXIF orientation is applied. A file it cannot read (not
found, empty, not an image, truncated, more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``: a
possible decompression bomb) raises a :class:`DataError` naming the file.

``data.on_bad_image`` decides what a data set does with such a file: ``error`` (the default)
raises, ``skip`` returns None for it, logged by file name; :func:`collate_readable` then
leaves it out of its batch and counts it in the batch's ``"skipped"`` entry.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import default_collate

from glassmetric.errors import DataError

log = logging.getLogger("glassmetric.data")

POLICIES = ("error", "skip")

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


def open_image(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB, with an error that names the file when it cannot be read."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and img.width * img.height > limit:
                raise DataError(
                    f"cannot read image {path}: {img.width}x{img.height} pixels is more than "
                    f"PIL.Image.MAX_IMAGE_PIXELS = {limit} (a decompression bomb?)"
                )
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {path}") from e
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot read image {path}: {reason}") from e


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
    return batch if "image" in batch else None
