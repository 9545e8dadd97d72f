"""Typed configuration: presets in YAML, overrides from the command line, strict validation.

A configuration is a tree of dataclasses. ``load_config`` reads a preset name or a YAML file,
applies ``key.sub=value`` overrides, and checks every key and value against the dataclass
annotations, so an unknown key or a bad value fails at once with a message naming it
(``ConfigError: trainer.max_epochs: expected int >= 1, got -3``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from glassmetric.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class SyntheticConfig:
    num_classes: int = 120
    images_per_class: int = 40
    seed: int = 0
    #: style of every image of the training and test classes
    style: Literal["photo", "painting"] = "photo"
    #: cross-domain test: the test queries in ``style``, the gallery of the same test classes
    #: in this style (e.g. photo queries against a painting gallery); null: one test set
    gallery_style: Literal["photo", "painting"] | None = None


@dataclass
class ExtraTrainConfig:
    """One more labelled set whose classes join the training classes (``data.extra_train``)."""

    #: the set's folder (a CSV file for ``csv``); may name environment variables, e.g.
    #: ``${GLASSMETRIC_DATA_ROOT}/cub2010_51_100``
    root: str | None = None
    #: its layout: ``folder`` (a sub-folder per class), ``csv``, ``cub200``, ``cars196``, ``sop``
    #: (its Ebay_train.txt), or ``auto``: detected from the files under ``root``
    kind: Literal["auto", "folder", "csv", "cub200", "cars196", "sop"] = "auto"
    #: cub200 / cars196: the inclusive class-id range taken (null: every class)
    classes: tuple[int, int] | None = None
    #: false: a class name that an earlier training source already has is an error; true: the
    #: classes are the same, and this set's images join that class
    merge_names: bool = False


@dataclass
class DataConfig:
    #: synthetic (embedded, no download) | cub200 | cars196 | sop | folder | csv: the data sets
    #: of glassmetric.data.registry.DATASETS (tests/test_registries.py checks the two agree)
    name: Literal["synthetic", "cub200", "cars196", "sop", "folder", "csv"] = "synthetic"
    #: data set root (folder for ``folder``, the CSV file for ``csv``); ``${NAME}`` is replaced by
    #: the environment variable NAME when the data is read (the real-data presets read
    #: ``${GLASSMETRIC_DATA_ROOT}/<data set>``)
    root: str | None = None
    #: test root for ``folder`` / ``csv`` data sets, whose classes are disjoint from ``root``'s
    test_root: str | None = None
    #: inclusive class-id ranges of the zero-shot split (CUB: 1-100 / 101-200; Cars: 1-98 / 99-196);
    #: for ``folder`` without a test_root: 1-based positions in the sorted class-folder names
    train_classes: tuple[int, int] | None = None
    test_classes: tuple[int, int] | None = None
    #: more labelled sets trained on with the training classes of ``root``: a list of mappings
    #: ``{root, kind: auto | folder | csv | cub200 | cars196 | sop, classes: [first, last]
    #: (cub200 / cars196 only), merge_names: false}``, e.g. ``[{root: /data/birds_extra}]``. A class
    #: name two sets share is an error unless the later set says ``merge_names: true``; no class
    #: of any set may be a test class (by name, and by id for the test data set's layout)
    extra_train: tuple[ExtraTrainConfig, ...] = ()
    #: number of training classes held out for model selection (0: select the last epoch)
    val_classes: int = 0
    image_size: int = 224
    #: area range of the random training crops (torchvision RandomResizedCrop's scale)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    #: crop size at evaluation (default image_size); larger than training helps (Touvron et al. 2019)
    eval_image_size: int | None = None
    #: shorter side before the centre crop at evaluation (default eval_image_size * 256 / 224)
    resize: int | None = None
    num_workers: int = 2
    #: an unreadable image (truncated, not an image, too large, deleted): ``error`` stops with a
    #: message naming the file; ``skip`` leaves it out of its batch, logged and counted
    on_bad_image: Literal["error", "skip"] = "error"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    #: a name of glassmetric.models.backbones.BACKBONES (resnet18, resnet34, resnet50, resnet101,
    #: efficientnet_lite0, efficientnet_lite1, efficientnet_lite2) or ``timm:<model>``
    backbone: str = "resnet50"
    #: false, true (ImageNet weights from the usual cache) or a path to a weights file
    pretrained: bool | str = False
    frozen_bn: bool = False
    #: module paths of the backbone to train (e.g. [blocks.5, blocks.6, conv_head]); null: all
    trainable_backbone: tuple[str, ...] | None = None
    embedding_dim: int = 128
    pooling: Literal["avg", "max", "gem", "avgmax"] = "avg"
    #: initial global head: ``kaiming`` (random projection) or ``identity`` (W = I: the embedding
    #: starts as the pooled pretrained feature; needs embedding_dim = the backbone's channels)
    head_init: Literal["kaiming", "identity"] = "kaiming"
    #: g of the g x g grid of local embeddings for structural matching (0: no spatial head)
    spatial_grid: int = 0
    #: ``shared``: the global head's linear layer at every location (DIML); ``own``: a separate 1x1 conv
    spatial_head: Literal["shared", "own"] = "shared"
    #: size of the un-normalised uncertainty embedding of introspective similarity (0: none)
    uncertainty_dim: int = 0
    #: k attention groups of attentive grouping (DGML); 0: off. embedding_dim must divide by k
    groups: int = 0
    #: standard deviation of the groups' initial queries (normal, mean 0). 1: sharply peaked
    #: random attention from the start (the default). A small value (e.g. 0.1) starts every group
    #: near average pooling, i.e. from the pretrained feature's retrieval geometry; the groups
    #: then specialise during training (on CUB-50 +7.6 R@1 for seed 0, BENCHMARKS.md)
    group_query_std: float = 1.0


@dataclass
class LossConfig:
    #: the losses of glassmetric.losses.metric_losses.LOSSES (tests/test_registries.py checks the two agree)
    name: Literal["contrastive", "triplet", "margin", "multisimilarity", "proxyanchor", "proxynca", "fastap"] = (
        "multisimilarity"
    )
    #: keyword arguments of the pytorch-metric-learning loss, overriding the paper defaults
    params: dict[str, Any] = field(default_factory=dict)
    #: keyword arguments of the loss's miner (if it has one), overriding the paper defaults
    miner_params: dict[str, Any] = field(default_factory=dict)
    #: learning rate of the loss's own parameters (proxies, beta); default: the paper's
    lr: float | None = None
    #: what the loss compares: the global cosine, DIML's structural similarity SS, or the
    #: multi-scale score s_global + SS (the last two need model.spatial_grid > 0), or IDML's
    #: introspective distance of semantic + uncertainty embeddings (needs model.uncertainty_dim > 0)
    similarity: Literal["global", "structural", "multiscale", "introspective"] = "global"
    #: mixup of image pairs (lambda ~ Beta(1, 1)): L(x, y) + lambda L(mix, y) + (1 - lambda) L(mix, y_perm)
    mixup: bool = False
    #: weight of the DGML diversity loss between the groups of an image (with model.groups);
    #: the paper uses 0.02 on CUB, 0.01 on Cars196, 0.03 on SOP
    diversity_weight: float = 0.02


@dataclass
class StructuralConfig:
    """Optimal-transport settings of the structural similarity (Zhao et al. 2021)."""

    epsilon: float = 0.05
    #: the most Sinkhorn iterations a problem gets
    iters: int = 100
    #: stop a problem once its L1 marginal error is at most this (None: always ``iters`` iterations)
    tol: float | None = 1e-4
    #: ``none_through_plan`` (the plan is a constant in the backward pass, DIML's setting) or
    #: ``unrolled`` (gradients through every Sinkhorn iteration)
    gradient: Literal["none_through_plan", "unrolled"] = "none_through_plan"
    #: ``cross_correlation`` (DIML: each cell weighted by its correlation with the other image's
    #: global embedding), ``pooled_cross_correlation`` (the same against the other image's mean
    #: cell, for local embeddings of a head of their own), ``uniform``, or ``auto``: pooled when
    #: ``model.spatial_head`` is ``own`` (its cells are not in the global embedding's space,
    #: e.g. with model.groups), else cross_correlation. Resolved when the config is validated.
    marginals: Literal["auto", "cross_correlation", "pooled_cross_correlation", "uniform"] = "auto"


@dataclass
class IntrospectiveConfig:
    """D = alpha exp(-(beta_scale beta + beta_offset) / (alpha_scale alpha + alpha_offset))
    (Wang et al. 2023; defaults of the authors' release)."""

    alpha_scale: float = 5.0
    alpha_offset: float = 0.0
    beta_scale: float = 1.0
    beta_offset: float = 4.0


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-5
    #: learning rate of the embedding heads (default: lr)
    head_lr: float | None = None
    #: learning rate of the grouping head's key / value convolutions (default: head_lr)
    grouping_lr: float | None = None
    #: learning rate of the grouping head's queries (default: grouping_lr)
    query_lr: float | None = None
    #: weight decay of the grouping head's keys / values and of its queries (default: weight_decay)
    grouping_weight_decay: float | None = None
    query_weight_decay: float | None = None
    weight_decay: float = 4e-4
    momentum: float = 0.9
    scheduler: Literal["none", "cosine", "step"] = "none"
    #: epochs at the start in which the backbone is not updated (only the new layers learn)
    warmup_epochs: int = 0
    #: step scheduler: multiply the learning rates by gamma every step_epochs epochs
    step_epochs: int = 30
    gamma: float = 0.5


@dataclass
class TrainerConfig:
    max_epochs: int = 150
    batch_size: int = 112
    #: images per class in a batch (the m of the m-per-class sampler)
    samples_per_class: int = 2
    #: auto (a GPU when there is one, else the CPU) | cpu | gpu (= cuda) | mps
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    #: devices per node: a number >= 1, "auto", or the indices of the GPUs ([0, 1] or "0,1");
    #: the losses see devices x num_nodes x batch_size
    devices: int | str | tuple[int, ...] = 1
    num_nodes: int = 1
    #: "auto" (one device: none; several: Lightning's DDP) or "ddp" (processes started by
    #: Lightning or by torchrun), "ddp_spawn"; see docs/training.md, "Several GPUs"
    strategy: Literal["auto", "ddp", "ddp_spawn"] = "auto"
    #: one BatchNorm statistic over the global batch (SyncBatchNorm) instead of one per device
    sync_batchnorm: bool = False
    precision: Literal["32-true", "16-mixed", "bf16-mixed"] = "32-true"
    output_dir: str = "runs/default"
    #: ``val``: keep the epoch with the best validation ``monitor`` (needs data.val_classes > 0); ``last``
    select: Literal["val", "last"] = "last"
    #: validation metric for model selection (MAP@R and R-Precision saturate later than R@1)
    monitor: Literal["recall@1", "r_precision", "map_at_r"] = "recall@1"
    #: evaluate the validation split every n epochs
    val_every: int = 1
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = None
    progress_bar: bool = True
    #: also rewrite checkpoints/last.ckpt every n training steps (0: at the end of each epoch
    #: only), so that a crash loses at most n steps; ``--resume`` continues mid-epoch exactly
    checkpoint_every_n_steps: int = 0
    #: a NaN or infinite loss or gradient: ``stop`` (save the state before that step in
    #: last.ckpt, then stop with a message) or ``skip`` (leave that step out, logged and counted)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    #: V > 0: compute the output of the backbone's frozen first stages once for V augmented views
    #: of every training image (float16, ``feature_cache.pt`` in the output folder) and train
    #: the rest of the network and the heads from it, one view per image and epoch; 0: off
    cache_features: int = 0
    #: a folder for the feature caches of several runs (one file per fingerprint, so runs of
    #: the same data, frozen weights, views and seed share one; e.g. every method of a study);
    #: None: ``feature_cache.pt`` in the output folder
    cache_dir: str | None = None


@dataclass
class IndexConfig:
    """The faiss gallery index of ``eval.knn_backend: index`` (:mod:`glassmetric.retrieval.index`)."""

    #: "auto": exact below exact_below items, HNSW below hnsw_below, IVF above
    kind: Literal["auto", "exact", "hnsw", "ivf"] = "auto"
    exact_below: int = 50_000
    #: HNSW recalls far better than IVF at equal speed but builds ~35x slower (BENCHMARKS.md)
    hnsw_below: int = 2_000_000
    #: HNSW: links per node, build and search beam widths
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    #: IVF: inverted lists (None: 4 sqrt(N), at most 4096) and lists probed per query
    nlist: int | None = None
    nprobe: int = 32
    #: recall@10 the search must reach, estimated on 200 gallery items against exact search:
    #: nprobe / ef_search (then a lower bound) are doubled until it does (null: as set)
    target_recall: float | None = 0.95


@dataclass
class EvalConfig:
    batch_size: int = 128
    #: R@K cut-offs (default: 1, 2, 4, 8; SOP: 1, 10, 100, 1000)
    recall_ks: tuple[int, ...] | None = None
    #: exact search: "auto" (faiss on the CPU when queries and gallery both number 8,000 or more,
    #: torch otherwise and on a GPU), "torch" or "faiss"; or "index": the faiss gallery index of
    #: eval.index (approximate above its thresholds)
    knn_backend: Literal["auto", "torch", "faiss", "index"] = "auto"
    index: IndexConfig = field(default_factory=IndexConfig)
    #: neighbours retrieved per query (null: as many as the metrics need, so they are exact);
    #: fewer than the largest class makes R-Precision and MAP@R too low, with a warning
    knn_k: int | None = None


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    structural: StructuralConfig = field(default_factory=StructuralConfig)
    introspective: IntrospectiveConfig = field(default_factory=IntrospectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: the widest embedding (and uncertainty embedding) a model may have
MAX_EMBEDDING_DIM = 65536

#: (key, predicate, description) range checks applied after type checks
_RANGES: list[tuple[str, Any, str]] = [
    ("seed", lambda v: 0 <= v <= 2**32 - 1, "between 0 and 2**32 - 1 = 4294967295 (numpy's seed range)"),
    ("data.val_classes", lambda v: v >= 0, ">= 0"),
    ("data.image_size", lambda v: 16 <= v <= 4096, "between 16 and 4096"),
    ("data.crop_scale", lambda v: 0 < v[0] <= v[1] <= 1, "a range (low, high) with 0 < low <= high <= 1"),
    ("data.eval_image_size", lambda v: v is None or 16 <= v <= 4096, "between 16 and 4096"),
    ("data.resize", lambda v: v is None or v >= 16, ">= 16"),
    ("data.num_workers", lambda v: v >= 0, ">= 0"),
    ("data.synthetic.num_classes", lambda v: v >= 4, ">= 4"),
    ("data.synthetic.images_per_class", lambda v: v >= 2, ">= 2"),
    ("data.train_classes", lambda v: v is None or v[0] <= v[1], "a range (first, last) with first <= last"),
    ("data.test_classes", lambda v: v is None or v[0] <= v[1], "a range (first, last) with first <= last"),
    ("model.embedding_dim", lambda v: 1 <= v <= MAX_EMBEDDING_DIM, f"between 1 and {MAX_EMBEDDING_DIM}"),
    ("model.spatial_grid", lambda v: 0 <= v <= 32, "between 0 and 32"),
    ("model.uncertainty_dim", lambda v: 0 <= v <= MAX_EMBEDDING_DIM, f"between 0 and {MAX_EMBEDDING_DIM}"),
    ("model.groups", lambda v: 0 <= v <= 64, "between 0 (off) and 64"),
    ("model.group_query_std", lambda v: v > 0, "> 0"),
    ("loss.diversity_weight", lambda v: v >= 0, ">= 0"),
    ("optim.grouping_lr", lambda v: v is None or v > 0, "> 0"),
    ("optim.query_lr", lambda v: v is None or v > 0, "> 0"),
    ("optim.grouping_weight_decay", lambda v: v is None or v >= 0, ">= 0"),
    ("optim.query_weight_decay", lambda v: v is None or v >= 0, ">= 0"),
    ("structural.epsilon", lambda v: v > 0, "> 0"),
    ("introspective.alpha_scale", lambda v: v > 0, "> 0"),
    ("introspective.alpha_offset", lambda v: v >= 0, ">= 0"),
    ("introspective.beta_scale", lambda v: v > 0, "> 0"),
    ("introspective.beta_offset", lambda v: v >= 0, ">= 0"),
    ("structural.iters", lambda v: v >= 1, ">= 1"),
    ("structural.tol", lambda v: v is None or v > 0, "> 0 (or null)"),
    ("loss.lr", lambda v: v is None or v > 0, "> 0"),
    ("optim.lr", lambda v: v > 0, "> 0"),
    ("optim.head_lr", lambda v: v is None or v > 0, "> 0"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.step_epochs", lambda v: v >= 1, ">= 1"),
    ("optim.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("optim.gamma", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("trainer.max_epochs", lambda v: v >= 1, ">= 1"),
    ("trainer.batch_size", lambda v: v >= 2, ">= 2"),
    ("trainer.num_nodes", lambda v: v >= 1, ">= 1"),
    ("trainer.samples_per_class", lambda v: v >= 2, ">= 2 (metric losses need positive pairs)"),
    ("trainer.val_every", lambda v: v >= 1, ">= 1"),
    ("trainer.log_every_n_steps", lambda v: v >= 1, ">= 1"),
    ("trainer.gradient_clip_val", lambda v: v is None or v > 0, "> 0"),
    ("trainer.checkpoint_every_n_steps", lambda v: v >= 0, ">= 0 (0: at epoch ends only)"),
    ("trainer.cache_features", lambda v: v >= 0, ">= 0 (0: off)"),
    ("eval.knn_k", lambda v: v is None or v >= 1, ">= 1"),
    ("eval.batch_size", lambda v: v >= 1, ">= 1"),
    ("eval.index.exact_below", lambda v: v >= 0, ">= 0"),
    ("eval.index.hnsw_below", lambda v: v >= 0, ">= 0"),
    ("eval.index.hnsw_m", lambda v: 2 <= v <= 256, "between 2 and 256"),
    ("eval.index.ef_construction", lambda v: v >= 1, ">= 1"),
    ("eval.index.ef_search", lambda v: v >= 1, ">= 1"),
    ("eval.index.nlist", lambda v: v is None or v >= 1, ">= 1"),
    ("eval.index.nprobe", lambda v: v >= 1, ">= 1"),
    ("eval.index.target_recall", lambda v: v is None or 0 < v <= 1, "in (0, 1]"),
    ("eval.recall_ks", lambda v: v is None or (len(v) > 0 and all(k >= 1 for k in v)), "positive integers"),
]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "value"
        if args and dataclasses.is_dataclass(args[0]):
            inner = inner.replace("a mapping", "mappings", 1)
        return f"a list of {inner}" + ("" if not args or args[-1] is Ellipsis else f" (length {len(args)})")
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping with the keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (lists -> tuples)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            if args and args[-1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
    elif tp is Any:
        return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and value == value
            and abs(value) != float("inf")
        ):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return _build(tp, value, key + ".")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys by their full name."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise ConfigError(f"unknown config key {prefix}{key!s} ({hint}known keys: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _get(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _devices(value: int | str | tuple[int, ...]) -> int | str:
    """``trainer.devices`` as Lightning takes it: a count >= 1, "auto", or GPU indices as a
    string ("0,1"; one index as "0,", since "0" would be a count)."""
    if isinstance(value, tuple):
        if value and all(i >= 0 for i in value) and len(set(value)) == len(value):
            return ",".join(map(str, value)) + ("," if len(value) == 1 else "")
    elif isinstance(value, int):
        if value >= 1:
            return value
    elif value.strip() == "auto" or (value.strip().isdigit() and int(value) >= 1):
        return value.strip()
    else:
        indices = [i.strip() for i in value.split(",") if i.strip()]
        if (
            "," in value
            and indices
            and all(i.isdigit() for i in indices)
            and len(set(map(int, indices))) == len(indices)
        ):
            return value.strip()
    raise ConfigError(
        f"trainer.devices: expected a number of devices >= 1, 'auto', or GPU indices such as [0, 1] or '0,1', got {value!r}"
    )


def validate(cfg: Config) -> Config:
    """Range checks and cross-field checks; raises ConfigError naming the key."""
    for key, ok, what in _RANGES:
        value = _get(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}: expected {what}, got {value!r}")
    if cfg.trainer.batch_size % cfg.trainer.samples_per_class:
        raise ConfigError(
            f"trainer.batch_size: {cfg.trainer.batch_size} is not a multiple of "
            f"trainer.samples_per_class = {cfg.trainer.samples_per_class}"
        )
    if cfg.trainer.select == "val" and cfg.data.val_classes == 0:
        raise ConfigError(
            "trainer.select: 'val' needs data.val_classes > 0 (model selection never uses the test split)"
        )
    if cfg.trainer.cache_features and cfg.loss.mixup:
        raise ConfigError(
            "trainer.cache_features: loss.mixup mixes input images, which training on cached features "
            "never sees: set loss.mixup: false or trainer.cache_features: 0"
        )
    if cfg.loss.similarity == "introspective" and cfg.model.uncertainty_dim == 0:
        raise ConfigError(
            "loss.similarity: 'introspective' needs an uncertainty embedding: set model.uncertainty_dim (e.g. 512)"
        )
    if cfg.loss.similarity in ("structural", "multiscale") and cfg.model.spatial_grid == 0:
        raise ConfigError(
            f"loss.similarity: {cfg.loss.similarity!r} needs local embeddings: set model.spatial_grid (e.g. 4)"
        )
    m = cfg.model
    if m.groups and m.embedding_dim % m.groups:
        raise ConfigError(
            f"model.groups: model.embedding_dim = {m.embedding_dim} is not divisible by {m.groups} groups "
            f"(each group gets embedding_dim / groups dimensions)"
        )
    if m.groups and m.spatial_grid and m.spatial_head == "shared":
        raise ConfigError(
            "model.spatial_head: 'shared' applies the global head at every location, but model.groups "
            "replaces (and leaves untrained) the global head: use model.spatial_head=own"
        )
    cfg.trainer.devices = _devices(cfg.trainer.devices)
    from glassmetric.losses.metric_losses import check_params

    cfg.loss.params, cfg.loss.miner_params = check_params(cfg.loss.name, cfg.loss.params, cfg.loss.miner_params)
    if cfg.structural.marginals == "auto":
        own = m.spatial_grid and m.spatial_head == "own"
        cfg.structural.marginals = "pooled_cross_correlation" if own else "cross_correlation"
    if cfg.data.name == "synthetic":
        from glassmetric.data.synthetic import MAX_CLASSES

        if not 64 <= cfg.data.image_size <= 224:
            raise ConfigError(
                f"data.image_size: the embedded synthetic data is drawn at 64 to 224 px, got {cfg.data.image_size}"
            )
        if cfg.data.synthetic.num_classes > MAX_CLASSES:
            raise ConfigError(
                f"data.synthetic.num_classes: expected <= {MAX_CLASSES}, got {cfg.data.synthetic.num_classes}"
            )
    if cfg.data.name != "synthetic" and cfg.data.root is None:
        raise ConfigError(f"data.root: data set {cfg.data.name!r} needs a root folder")
    _validate_extra_train(cfg.data.extra_train)
    return cfg


def _validate_extra_train(entries: tuple[ExtraTrainConfig, ...]) -> None:
    """Each ``data.extra_train`` entry has a root, and a class range only where ids exist."""
    for i, entry in enumerate(entries):
        key = f"data.extra_train[{i}]"
        if not entry.root:
            raise ConfigError(f"{key}.root: every extra training set needs a root, e.g. {{root: /data/more_birds}}")
        if entry.classes is not None:
            if entry.classes[0] > entry.classes[1]:
                raise ConfigError(
                    f"{key}.classes: expected a range (first, last) with first <= last, got {entry.classes}"
                )
            if entry.kind not in ("cub200", "cars196"):
                raise ConfigError(
                    f"{key}.classes: a class-id range needs kind cub200 or cars196 (whose classes have ids), got kind {entry.kind!r}"
                )


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. trainer.max_epochs=10")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {_yaml_problem(e, raw)}") from e
    return key.split("."), value


def _merge(base: dict, parts: list[str], value: Any) -> None:
    node = base
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


#: the largest config file read: configs are a few KiB; this stops /dev/zero and the like
MAX_CONFIG_BYTES = 1 << 20
#: the deepest nesting of mappings and lists in a config file or override value
MAX_CONFIG_DEPTH = 32


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases and with bounded nesting.

    An alias (``*name``) repeats its anchor's value by reference: ten lines of aliases of
    aliases stand for billions of values, which the first copy of the config (``save_config``)
    would expand. Deep nesting (``[[[[...``) overflows the recursion of YAML's composer.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None,
                None,
                "YAML aliases (*name) are not accepted in configs: write the value out",
                self.peek_event().start_mark,
            )
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_CONFIG_DEPTH and self.check_event(yaml.CollectionStartEvent):
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_CONFIG_DEPTH} levels deep", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)


def _line_column(text: str | bytes, index: int) -> str:
    if isinstance(text, str):
        line, start = text.count("\n", 0, index) + 1, text.rfind("\n", 0, index) + 1
    else:
        line, start = text.count(b"\n", 0, index) + 1, text.rfind(b"\n", 0, index) + 1
    return f"line {line}, column {index - start + 1}"


def _yaml_problem(e: yaml.YAMLError, text: str) -> str:
    """A YAML error on one line: where (line, column) and what."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        what = f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}"
        if e.context:
            where = f" at line {e.context_mark.line + 1}, column {e.context_mark.column + 1}" if e.context_mark else ""
            what += f" ({e.context}{where})"
        return what
    if isinstance(e, yaml.reader.ReaderError):
        return f"{_line_column(text, e.position)}: character {e.character:#06x} is not allowed in YAML"
    return " ".join(str(e).split())


def read_yaml(path: Path) -> dict:
    """The mapping in the YAML file ``path`` (at most MAX_CONFIG_BYTES, UTF-8, no aliases);
    every problem is a one-line ConfigError naming the file (and the line and column)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {path} is not UTF-8 text: byte {raw[e.start]:#04x} at {_line_column(raw, e.start)}"
        ) from e
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e, text)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a preset shipped in ``configs/``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.exists():
        raise ConfigError(f"unknown preset {name_or_path!r} (presets: {', '.join(preset_names())})")
    return preset


def config_from_dict(values: dict, overrides: Sequence[str] = ()) -> Config:
    values = dict(values)
    for text in overrides:
        _merge(values, *parse_override(text))
    return validate(_build(Config, values))


def load_config(name_or_path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a preset or YAML file (or the defaults when None), apply overrides, validate."""
    values = read_yaml(resolve_config_path(name_or_path)) if name_or_path else {}
    return config_from_dict(values, overrides)


def save_config(cfg: Config, path: Path) -> None:
    """Write ``cfg`` as YAML to ``path`` atomically (a crash leaves the old file or the new one)."""
    from glassmetric.outputs import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively, so the YAML stays readable."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
