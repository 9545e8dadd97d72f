"""A backbone cut in two: the frozen first stages, and the rest that trains.

:func:`split_frozen` lists the trunk's stages in forward order and takes the longest run of
leading stages that training cannot change: no parameter with ``requires_grad``, every
BatchNorm layer in eval mode while the model trains (``model.frozen_bn``, or outside
``model.trainable_backbone``), no active dropout. Their output, for a given input, is then the
same at every step, which is what a feature cache stores (:mod:`glassmetric.training.feature_cache`).
A stage that is partly frozen (``blocks.5`` when only ``blocks.5.2`` trains) is split
further when it is an ``nn.Sequential``.

The trunks whose stage order is known: torchvision ResNets (an ``nn.Sequential`` trunk), timm
EfficientNets (EfficientNet-Lite included) and timm ResNets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from glassmetric.errors import ConfigError
from glassmetric.models.backbone import Backbone

__all__ = ["FrozenSplit", "split_frozen"]

#: timm model class name -> the modules ``forward_features`` runs, in order
_TIMM_STAGES: dict[str, tuple[str, ...]] = {
    "EfficientNet": ("conv_stem", "bn1", "blocks", "conv_head", "bn2"),
    "ResNet": ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"),
}

_KEY = "trainer.cache_features"


@dataclass(frozen=True)
class FrozenSplit:
    """``backbone(images) == backbone.to_feature_map(rest(frozen_features(images)))``.

    ``frozen`` and ``trainable`` are ``(module path in the trunk, module)`` in forward order;
    the modules are the backbone's own (shared, not copied), so the model's weights and
    checkpoints are those of the whole backbone.
    """

    backbone: Backbone
    frozen: tuple[tuple[str, nn.Module], ...]
    trainable: tuple[tuple[str, nn.Module], ...]

    @property
    def boundary(self) -> str:
        """The module path of the last frozen stage (its output is what the cache holds)."""
        return self.frozen[-1][0]

    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen stages' output for ``(B, 3, H, W)`` images."""
        x = images
        for _, module in self.frozen:
            x = module(x)
        return x

    def rest(self, features: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map ``(B, C, h, w)`` from the frozen stages' output."""
        x = features
        for _, module in self.trainable:
            x = module(x)
        return self.backbone.to_feature_map(x)

    def frozen_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter and buffer of the frozen stages, by its path in the trunk."""
        for path, module in self.frozen:
            for name, tensor in module.state_dict().items():
                yield f"{path}.{name}", tensor


def split_frozen(backbone: Backbone) -> FrozenSplit:
    """Split ``backbone`` after its leading frozen stages; a ConfigError naming
    ``trainer.cache_features`` when the trunk's stages are unknown or its first stage trains."""
    stages = _stages(backbone)
    if stages is None:
        raise ConfigError(
            f"{_KEY}: backbone {backbone.name!r} cannot be split into a frozen and a trainable part "
            "(supported: torchvision ResNets, EfficientNet-Lite, timm EfficientNets and ResNets); "
            f"set {_KEY}: 0"
        )
    training = backbone.training
    backbone.train()  # frozen BatchNorm layers are those that stay in eval mode in training
    try:
        frozen, trainable = _leading_frozen(stages, "")
    finally:
        backbone.train(training)
    if not frozen:
        raise ConfigError(
            f"{_KEY}: the first stage of backbone {backbone.name!r} ({stages[0][0]}) trains, so there is no "
            "frozen part to cache: list the modules that train in model.trainable_backbone (the cub50 preset: "
            f"[blocks.5, blocks.6, conv_head]) with model.frozen_bn: true, or set {_KEY}: 0"
        )
    return FrozenSplit(backbone, tuple(frozen), tuple(trainable))


def _stages(backbone: Backbone) -> list[tuple[str, nn.Module]] | None:
    trunk = backbone.trunk
    if getattr(trunk, "grad_checkpointing", False):
        return None
    if type(trunk) is nn.Sequential:
        return list(trunk.named_children())
    names = _TIMM_STAGES.get(type(trunk).__name__)
    if names is None or not type(trunk).__module__.startswith("timm."):
        return None
    return [(name, getattr(trunk, name)) for name in names]


def _leading_frozen(
    stages: list[tuple[str, nn.Module]], prefix: str
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """(the leading frozen stages, every stage after them), a partly frozen ``nn.Sequential``
    opened into its children."""
    frozen: list[tuple[str, nn.Module]] = []
    for i, (name, module) in enumerate(stages):
        path = prefix + name
        if _is_frozen(module):
            frozen.append((path, module))
            continue
        after = [(prefix + n, m) for n, m in stages[i + 1 :]]
        children = list(module.named_children())
        if type(module) is nn.Sequential and children and _is_frozen(children[0][1]):
            inner_frozen, inner_rest = _leading_frozen(children, path + ".")
            return frozen + inner_frozen, inner_rest + after
        return frozen, [(path, module), *after]
    return frozen, []


def _is_frozen(module: nn.Module) -> bool:
    """Whether ``module``'s output depends on nothing but its input while the model trains."""
    for m in module.modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            return False
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            return False
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            return False
        if m.training and float(getattr(m, "drop_prob", 0.0) or 0.0) > 0:  # timm DropPath
            return False
    return True
