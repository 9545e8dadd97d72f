"""The :class:`Backbone` wrapper every trunk is built into, and reading weights files.

A backbone returns the unpooled last feature map ``(B, C, h, w)`` of its trunk and carries
what the rest of the model needs to know about it: channels, stride, input normalisation,
which stages train, and a checked weights loader.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn

from glassmetric.errors import ConfigError, WeightsError

__all__ = [
    "CLASSIFIER_PREFIXES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "HasBackbone",
    "few_keys",
    "read_state_dict",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Classifier parameters that a checkpoint may carry but a trunk never has.
CLASSIFIER_PREFIXES: tuple[str, ...] = ("fc.", "classifier.", "head.", "head_dist.", "last_linear.")

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
        return self.to_feature_map(feats, images.shape[-2:])

    def to_feature_map(self, feats: torch.Tensor, image_hw: torch.Size | None = None) -> torch.Tensor:
        """The trunk's output ``feats`` as a ``(B, out_channels, h, w)`` map; ``image_hw``, the
        input's size, places the tokens of a ViT-style trunk on their grid."""
        if feats.dim() == 4:
            if self._channels_last_output:
                feats = feats.permute(0, 3, 1, 2)
        elif feats.dim() == 3 and image_hw is not None:  # tokens (B, N, C) of a ViT-style model
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
            m
            for n, m in self.trunk.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not _under(n, trainable)
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
        state = read_state_dict(path)
        self.load_trunk_state_dict(state, source=path.name)

    def load_trunk_state_dict(self, state: Mapping[str, torch.Tensor], *, source: str) -> None:
        """Strictly load ``state`` into the trunk; ``source`` names it in error messages."""
        own = self.trunk.state_dict()
        state = _strip_shared_prefix(dict(state), own)
        state = {k: v for k, v in state.items() if k in own or not k.startswith(CLASSIFIER_PREFIXES)}
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing key(s) {few_keys(missing)}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected key(s) {few_keys(unexpected)}")
            raise WeightsError(f"weights in {source} do not fit backbone {self.name!r}: " + "; ".join(parts))
        bad = [
            f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if tuple(v.shape) != tuple(own[k].shape)
        ]
        if bad:
            raise WeightsError(
                f"weights in {source} do not fit backbone {self.name!r}: {len(bad)} shape "
                f"mismatch(es) (file vs model) {few_keys(bad)}"
            )
        self.trunk.load_state_dict(state, strict=True)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, out_channels={self.out_channels}, stride={self.stride}, frozen_bn={self.frozen_bn}"


# ---------------------------------------------------------------------- building
# ---------------------------------------------------------------------- helpers
class HasBackbone(Protocol):
    """A model that exposes its :class:`Backbone` (an EmbeddingModel, or the inference view of one)."""

    @property
    def backbone(self) -> Backbone: ...


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth / .pt / .safetensors file, unwrapped from common checkpoint dicts."""
    try:
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError as exc:
                raise WeightsError(f"{path.name}: reading .safetensors needs the 'safetensors' package") from exc
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


def _strip_shared_prefix(state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def few_keys(keys: list[str]) -> str:
    """The first few ``keys`` for an error message, ``[a, b, ...]``."""
    shown = ", ".join(keys[:_SHOW_KEYS])
    return f"[{shown}{', ...' if len(keys) > _SHOW_KEYS else ''}]"
