"""Backbone + global head + optional extra heads, returning one :class:`EmbeddingOutput`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from glassmetric.errors import ConfigError
from glassmetric.models.backbone import Backbone
from glassmetric.models.backbones import build_backbone
from glassmetric.models.global_head import GlobalHead
from glassmetric.models.output import EmbeddingOutput

_OUTPUT_FIELDS = frozenset(f.name for f in fields(EmbeddingOutput))
_RESERVED_GROUPS = frozenset({"backbone", "head"})


class EmbeddingModel(nn.Module):
    """Images -> :class:`EmbeddingOutput`.

    The backbone gives the feature map, the :class:`GlobalHead` the L2-normalised embedding and
    the pooled feature. Extra heads (spatial grid, grouping, uncertainty ...) are added with
    :meth:`add_head`; each is a module with
    ``forward(feature_map, pooled, output) -> dict[field name, tensor]`` and runs, in the order
    added, after the global head, so it may read what earlier heads set on ``output``.
    """

    def __init__(self, backbone: Backbone, head: GlobalHead) -> None:
        super().__init__()
        if head.in_channels != backbone.out_channels:
            raise ConfigError(
                f"head expects {head.in_channels} input channels but backbone "
                f"{backbone.name!r} gives {backbone.out_channels}"
            )
        self.backbone = backbone
        self.head = head
        self.extra_heads = nn.ModuleDict()

    @property
    def embedding_dim(self) -> int:
        return self.head.embedding_dim

    def add_head(self, name: str, module: nn.Module) -> None:
        """Add an extra head; its parameters form the optimiser group ``name``."""
        if not isinstance(name, str) or not name.isidentifier() or name in _RESERVED_GROUPS:
            raise ConfigError(f"extra head name must be an identifier other than 'backbone' / 'head', got {name!r}")
        if name in self.extra_heads:
            raise ConfigError(f"an extra head named {name!r} is already present")
        if not isinstance(module, nn.Module):
            raise ConfigError(f"extra head {name!r} must be an nn.Module, got {type(module).__name__}")
        try:
            self.extra_heads[name] = module
        except KeyError as exc:  # a name that shadows an nn.ModuleDict attribute
            raise ConfigError(f"extra head name {name!r} is not allowed: {exc}") from exc

    def forward(self, images: torch.Tensor) -> EmbeddingOutput:
        return self.forward_feature_map(self.backbone(images))

    def forward_feature_map(self, feature_map: torch.Tensor) -> EmbeddingOutput:
        """The heads' output for the backbone's feature map ``(B, C, h, w)`` (what ``forward``
        does after the backbone; training on cached features starts here)."""
        embedding, pooled = self.head(feature_map)
        output = EmbeddingOutput(embedding=embedding, feature_map=feature_map, pooled=pooled)
        for name, extra in self.extra_heads.items():
            updates = extra(feature_map, pooled, output)
            if not isinstance(updates, Mapping):
                raise TypeError(f"extra head {name!r} must return a dict, got {type(updates).__name__}")
            unknown = sorted(set(updates) - _OUTPUT_FIELDS)
            if unknown:
                raise ConfigError(
                    f"extra head {name!r} returned unknown output field(s) {unknown}; "
                    f"EmbeddingOutput has {sorted(_OUTPUT_FIELDS)}"
                )
            for field, value in updates.items():
                setattr(output, field, value)
        return output

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` embeddings in eval mode, without gradients; training flags are restored."""
        modes = {m: m.training for m in self.modules()}
        self.eval()
        try:
            return self(images).embedding
        finally:
            for module, training in modes.items():
                module.training = training

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part: ``"backbone"``, ``"head"``, then one per extra head.

        An extra head with its own ``parameter_groups()`` (e.g. the grouping head's keys /
        values and queries) contributes one group per part, named ``"<head>.<part>"``.
        Parameters with ``requires_grad=False`` (e.g. frozen BatchNorm) are left out.
        """
        groups = {"backbone": _trainable(self.backbone), "head": _trainable(self.head)}
        for name, extra in self.extra_heads.items():
            parameter_groups = getattr(extra, "parameter_groups", None)
            if parameter_groups is not None:
                for part, params in parameter_groups().items():
                    groups[f"{name}.{part}"] = [p for p in params if p.requires_grad]
            else:
                groups[name] = _trainable(extra)
        return groups


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def build_model(
    backbone: str,
    embedding_dim: int,
    *,
    pretrained: bool | str | os.PathLike[str] = False,
    frozen_bn: bool = False,
    pooling: str = "avg",
    gem_p: float = 3.0,
    normalize: bool = True,
    head_init: str = "kaiming",
    timm_kwargs: Mapping[str, Any] | None = None,
) -> EmbeddingModel:
    """Backbone ``backbone`` (see :func:`build_backbone`) with a ``GlobalHead`` of size ``embedding_dim``."""
    net = build_backbone(backbone, pretrained=pretrained, frozen_bn=frozen_bn, timm_kwargs=timm_kwargs)
    head = GlobalHead(
        net.out_channels, embedding_dim, pooling=pooling, gem_p=gem_p, normalize=normalize, init=head_init
    )
    return EmbeddingModel(net, head)
