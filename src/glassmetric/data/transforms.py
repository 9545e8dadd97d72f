"""Image transforms: the standard deep metric learning recipe (Roth et al., 2020)."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T

from glassmetric.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_resize(image_size: int) -> int:
    """Shorter side before the evaluation centre crop: the usual 256 / 224 ratio."""
    return round(image_size * 256 / 224)


def eval_geometry(image_size: int, resize: int | None = None) -> T.Compose:
    """The deterministic evaluation geometry, on PIL images: Resize(resize) of the shorter side,
    then CenterCrop(image_size). Also what figures show: the image as the model sees it."""
    return T.Compose([T.Resize(default_resize(image_size) if resize is None else resize), T.CenterCrop(image_size)])


def normalisation(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """PIL image -> normalised float tensor: what every transform does after its geometry."""
    return T.Compose([T.ToTensor(), T.Normalize(mean, std)])


def build_transforms(
    train: bool,
    image_size: int,
    resize: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> T.Compose:
    """PIL image -> normalised (3, image_size, image_size) float tensor.

    Training: RandomResizedCrop(image_size, scale=crop_scale) + RandomHorizontalFlip. Evaluation (deterministic):
    :func:`eval_geometry` (Resize(resize) of the shorter side, default
    :func:`default_resize`, then CenterCrop(image_size)). ``resize`` is ignored for training.
    """
    if image_size < 1:
        raise ConfigError(f"image_size must be positive, got {image_size}")
    resize = default_resize(image_size) if resize is None else resize
    if resize < image_size:
        raise ConfigError(f"resize must be at least image_size {image_size}, got {resize}")
    if train:
        geometry = [T.RandomResizedCrop(image_size, scale=crop_scale), T.RandomHorizontalFlip()]
    else:
        geometry = eval_geometry(image_size, resize).transforms
    return T.Compose([*geometry, *normalisation(mean, std).transforms])
