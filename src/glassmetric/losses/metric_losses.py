"""Metric-learning losses, taken from pytorch-metric-learning, chosen by name.

Each name maps to a loss (and, where its paper uses one, a miner) with the paper's
hyper-parameters as defaults:

=================  =====================================  ====================================
name               loss (defaults)                        miner (defaults)
=================  =====================================  ====================================
contrastive        Hadsell et al. 2006: pos 0, neg 1      all pairs
triplet            Schroff et al. 2015: margin 0.2        semi-hard triplets (the loss margin)
margin             Wu et al. 2017: margin 0.2, beta 1.2,  distance-weighted sampling
                   learnable per-class beta (lr 5e-4)     (cutoff 0.5, non-zero loss beta+margin)
multisimilarity    Wang et al. 2019: alpha 2, beta 50,    multi-similarity pairs (eps 0.1)
                   base 0.5
proxyanchor        Kim et al. 2020: margin 0.1, alpha 32  none (proxies, lr 100 x base)
proxynca           Movshovitz-Attias et al. 2017          none (proxies, lr 100 x base)
fastap             Cakir et al. 2019: 10 bins             none
=================  =====================================  ====================================

The loss's own parameters (proxies, beta) live in the module, so they are saved in the
checkpoint, and :meth:`MetricLoss.learning_rate` gives them their own learning rate.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from pytorch_metric_learning import losses, miners

from glassmetric.errors import ConfigError
from glassmetric.losses import introspective
from glassmetric.losses.miners import SphereDistanceWeightedMiner
from glassmetric.losses.structural import StructuralSettings, structural_loss, use_structural_distance
from glassmetric.models.output import EmbeddingOutput
from glassmetric.similarity.introspective import IntrospectiveParams


@dataclass(frozen=True)
class LossSpec:
    build_loss: Callable[..., torch.nn.Module]
    loss_defaults: dict[str, Any]
    build_miner: Callable[..., torch.nn.Module] | None = None
    miner_defaults: dict[str, Any] | None = None
    #: the loss needs the number of training classes and the embedding size (proxies, beta)
    needs_classes: bool = False
    #: learning rate of the loss's parameters: ("relative", x) = x * base lr, ("absolute", x)
    param_lr: tuple[str, float] = ("relative", 1.0)
    #: miner defaults that follow the loss's final settings (e.g. the triplet margin)
    miner_from_loss: Callable[[dict], dict] | None = None
    #: what the loss's margins are calibrated for: a "similarity" in [-1, 1] or the Euclidean
    #: "distance" of unit vectors; None for proxy losses (proxies have no spatial embeddings)
    calibration: str | None = "distance"
    #: the miner needs the dimension of the embedding sphere (introspective embeddings are packed
    #: with their uncertainty, so wider)
    miner_needs_dimension: bool = False
    #: the class whose keyword arguments ``loss.params`` sets, where build_loss wraps it
    loss_class: type | None = None


LOSSES: dict[str, LossSpec] = {
    "contrastive": LossSpec(losses.ContrastiveLoss, {"pos_margin": 0.0, "neg_margin": 1.0}),
    "triplet": LossSpec(
        losses.TripletMarginLoss,
        {"margin": 0.2},
        miners.TripletMarginMiner,
        {"margin": 0.2, "type_of_triplets": "semihard"},
        miner_from_loss=lambda kw: {"margin": kw["margin"]},
    ),
    "margin": LossSpec(
        lambda num_classes, embedding_size, **kw: losses.MarginLoss(num_classes=num_classes, **kw),
        {"margin": 0.2, "beta": 1.2, "nu": 0.0, "learn_beta": True},
        SphereDistanceWeightedMiner,
        {"cutoff": 0.5, "nonzero_loss_cutoff": 1.4},
        needs_classes=True,
        param_lr=("absolute", 5e-4),
        miner_needs_dimension=True,
        loss_class=losses.MarginLoss,
        # sample only negatives that can have a non-zero loss: d < beta + margin (Wu et al.)
        miner_from_loss=lambda kw: {"nonzero_loss_cutoff": kw["beta"] + kw["margin"]},
    ),
    "multisimilarity": LossSpec(
        losses.MultiSimilarityLoss,
        {"alpha": 2.0, "beta": 50.0, "base": 0.5},
        miners.MultiSimilarityMiner,
        {"epsilon": 0.1},
        calibration="similarity",
    ),
    "proxyanchor": LossSpec(
        losses.ProxyAnchorLoss,
        {"margin": 0.1, "alpha": 32.0},
        needs_classes=True,
        param_lr=("relative", 100.0),
        calibration=None,
    ),
    "proxynca": LossSpec(
        losses.ProxyNCALoss,
        {"softmax_scale": 1.0},
        needs_classes=True,
        param_lr=("relative", 100.0),
        calibration=None,
    ),
    "fastap": LossSpec(losses.FastAPLoss, {"num_bins": 10}),
}


def _construct(factory: Callable, kwargs: dict, what: str) -> torch.nn.Module:
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what}: {e}") from e


#: keyword arguments that glassmetric sets itself, and from what
_SET_BY_GLASSMETRIC = {
    "num_classes": "the training classes",
    "embedding_size": "model.embedding_dim",
    "dimension": "model.embedding_dim",
    "distance": "loss.similarity",
    "mat_based_loss": "the loss",
}
#: keyword arguments whose default is None but that take a plain value
_PLAIN_NONE_DEFAULTS = {"collect_stats": bool}


def _keywords(cls: type) -> dict[str, Any]:
    """Every keyword argument ``cls(...)`` accepts, through the ``**kwargs`` its bases take,
    with its default (``inspect.Parameter.empty`` for none)."""
    found: dict[str, Any] = {}
    for klass in inspect.getmro(cls):
        if "__init__" in vars(klass) and klass is not object:
            for p in inspect.signature(vars(klass)["__init__"]).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    found.setdefault(p.name, p.default)
    return found


def _checked(value: Any, default: Any, key: str) -> Any:
    """``value`` of a keyword argument whose default is ``default``: a finite number where the
    default is a number, true / false where it is a bool; a plain value where it has no default
    to go by; refused where the default is None (an object: a reducer, a regularizer, ...)."""
    if isinstance(default, bool) or _PLAIN_NONE_DEFAULTS.get(key.rsplit(".", 1)[-1]) is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if isinstance(default, (int, float)):
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return value
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if default is None:
        raise ConfigError(f"{key}: takes a Python object (e.g. a reducer or regularizer), which a config cannot give")
    if isinstance(value, (str, int, float, bool)) and not (isinstance(value, float) and not math.isfinite(value)):
        return value
    raise ConfigError(f"{key}: expected a number or a string, got {value!r}")


def _check_keywords(cls: type, values: dict, defaults: dict, section: str) -> dict:
    accepted = {**_keywords(cls), **defaults}
    settable = sorted(
        k for k, v in accepted.items() if k not in _SET_BY_GLASSMETRIC and (v is not None or k in _PLAIN_NONE_DEFAULTS)
    )
    checked = {}
    for name, value in values.items():
        # a name that is not a plain identifier (a newline, a number) is shown quoted, on one line
        key = f"{section}.{name if isinstance(name, str) and name.isidentifier() else repr(name)}"
        if name in _SET_BY_GLASSMETRIC:
            raise ConfigError(f"{key}: set by glassmetric (from {_SET_BY_GLASSMETRIC[name]}), not by the config")
        if name not in accepted:
            raise ConfigError(
                f"{key}: not a parameter of pytorch-metric-learning's {cls.__name__} (its parameters: {', '.join(settable)})"
            )
        checked[name] = _checked(value, accepted[name], key)
    return checked


def check_params(name: str, params: dict, miner_params: dict) -> tuple[dict, dict]:
    """``loss.params`` and ``loss.miner_params`` of the loss ``name``, checked against the
    keyword arguments of its pytorch-metric-learning classes (numbers where their defaults are
    numbers, ...); returned with numbers written as strings (``1e-3``) read as numbers.
    Raises ConfigError naming the key (``loss.params.alpha``)."""
    spec = LOSSES[name]
    cls = spec.loss_class or cast(type, spec.build_loss)  # without loss_class, build_loss is the class itself
    params = _check_keywords(cls, params, spec.loss_defaults, "loss.params")
    if spec.build_miner is None:
        if miner_params:
            raise ConfigError(f"loss.miner_params: loss {name!r} uses no miner, got {miner_params!r}")
        return params, {}
    miner_class = cast(type, spec.build_miner)  # every miner is built by its class
    return params, _check_keywords(miner_class, miner_params, spec.miner_defaults or {}, "loss.miner_params")


class MetricLoss(torch.nn.Module):
    """A pytorch-metric-learning loss (+ miner) applied to a model's global embedding; with
    ``structural`` settings, to the structural similarity of its global + local embeddings; with
    ``introspective``, to the introspective distance of its semantic + uncertainty embeddings."""

    def __init__(
        self,
        name: str,
        loss: torch.nn.Module,
        miner: torch.nn.Module | None,
        param_lr: tuple[str, float],
        structural: StructuralSettings | None = None,
        introspective: bool = False,
    ):
        super().__init__()
        self.name = name
        self.loss = loss
        self.miner = miner
        self._param_lr = param_lr
        self.structural = structural
        self.introspective = introspective

    def forward(self, output: EmbeddingOutput, labels: torch.Tensor) -> torch.Tensor:
        if self.structural is not None:  # what StructuralLoss computes
            if output.local is None:
                raise ConfigError(
                    "loss.similarity: structural losses need local embeddings: set model.spatial_grid > 0"
                )
            return structural_loss(self.loss, self.miner, output.embedding, output.local, labels, self.structural)
        embeddings = output.embedding.float()
        if self.introspective:  # what IntrospectiveLoss computes
            if output.uncertainty is None:
                raise ConfigError(
                    "loss.similarity: 'introspective' needs an uncertainty embedding: set model.uncertainty_dim > 0"
                )
            return introspective.introspective_loss(
                self.loss, self.miner, embeddings, output.uncertainty.float(), labels
            )
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, indices)

    def learning_rate(self, base_lr: float) -> float:
        """The learning rate of this loss's own parameters, given the backbone's."""
        kind, value = self._param_lr
        return value * base_lr if kind == "relative" else value


def build_loss(
    name: str,
    *,
    embedding_dim: int,
    num_classes: int,
    params: dict | None = None,
    miner_params: dict | None = None,
    structural: StructuralSettings | None = None,
    introspective_params: IntrospectiveParams | None = None,
) -> MetricLoss:
    """The loss ``name`` with its paper defaults, updated by ``params`` / ``miner_params``.

    With ``structural`` settings, the loss and its miner compare images by DIML's structural
    similarity (pair-based losses only; see :mod:`glassmetric.losses.structural`). With
    ``introspective_params``, every loss (proxy losses included: proxies carry zero uncertainty)
    compares by IDML's introspective distance (:mod:`glassmetric.losses.introspective`).

    ``num_classes`` is the number of training classes: labels passed to the loss must be
    contiguous class indices 0..num_classes-1 (proxy and per-class-beta losses index by them).
    """
    if name not in LOSSES:
        raise ConfigError(f"loss.name: unknown loss {name!r} (known: {', '.join(LOSSES)})")
    spec = LOSSES[name]
    kwargs = {**spec.loss_defaults, **(params or {})}
    if structural is not None:
        if spec.calibration is None:
            pair_losses = ", ".join(n for n, sp in LOSSES.items() if sp.calibration)
            raise ConfigError(
                f"loss.similarity: structural similarity needs a pair-based loss ({pair_losses}), not {name!r}"
            )
        if introspective_params is not None:
            raise ConfigError("loss.similarity: choose one of structural and introspective")
    if spec.needs_classes:
        kwargs = {"num_classes": num_classes, "embedding_size": embedding_dim, **kwargs}
    loss = _construct(spec.build_loss, kwargs, f"loss.params for {name!r}")
    miner = None
    if spec.build_miner is not None:
        defaults = {**(spec.miner_defaults or {}), **(spec.miner_from_loss(kwargs) if spec.miner_from_loss else {})}
        if spec.miner_needs_dimension:
            defaults["dimension"] = embedding_dim
        miner = _construct(spec.build_miner, {**defaults, **(miner_params or {})}, f"loss.miner_params for {name!r}")
    elif miner_params:
        raise ConfigError(f"loss.miner_params: loss {name!r} uses no miner, got {miner_params!r}")
    # the loss and its miner compare by the similarity of their own calibration, as
    # StructuralLoss / IntrospectiveLoss set it up
    for module in (loss, miner):
        if structural is not None:
            use_structural_distance(module)
        elif introspective_params is not None:
            introspective.use_introspective_distance(module, introspective_params, embedding_dim)
    return MetricLoss(name, loss, miner, spec.param_lr, structural, introspective=introspective_params is not None)
