"""Data-parallel training and evaluation on several processes (PyTorch Lightning DDP, torchrun).

Training: every rank embeds its own shard of the global batch (the m-per-class sampler gives
each rank disjoint batches of one seeded sequence); :func:`gather_batch` concatenates all
ranks' outputs in rank order, with ``torch.distributed.nn.functional.all_gather`` (the
differentiable all-gather Lightning's ``all_gather(sync_grads=True)`` uses), so every loss,
structural, grouped and introspective ones included, sees the whole global batch. Each rank
computes the same global loss; the backward of the all-gather sums the gradients every rank
sends to a shard, and DDP averages over the ranks, so the weights get exactly the gradient of
the global-batch loss of one process (proxies and other loss parameters too).

Evaluation: each rank embeds a shard of the data set (``DistributedSampler``, which pads the
shards to equal length by repeating items); :func:`gather_unique` collects every rank's rows
and puts each at its data-set index, so padded repeats are dropped and the result is the
one-process embedding matrix in data-set order.

Outside a process group (one process) every function here is the identity.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Subset

from glassmetric.data.base import IndexedDataset, RetrievalDataset
from glassmetric.models.output import EmbeddingOutput

__all__ = [
    "LOSS_FIELDS",
    "IndexedDataset",
    "distributed_embed",
    "eval_sampler",
    "gather_batch",
    "gather_unique",
    "world",
]

#: The output fields the losses read; gathered with gradient (feature maps and attention are not).
LOSS_FIELDS = ("embedding", "local", "group_embeddings", "uncertainty")


def world() -> tuple[int, int]:
    """``(world size, rank)`` of the default process group, ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _comm_device(tensor: Tensor) -> torch.device:
    """NCCL moves CUDA tensors only; gloo works on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device if tensor.device.type == "cpu" else torch.device("cpu")


def gather_batch(output: EmbeddingOutput, labels: Tensor) -> tuple[EmbeddingOutput, Tensor]:
    """All ranks' :data:`LOSS_FIELDS` and labels, concatenated in rank order.

    Gradients flow back to the rank that computed each row. Every rank must pass the same
    batch size (the m-per-class sampler drops incomplete batches).
    """
    size, _ = world()
    if size == 1:
        return output, labels
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # deprecated in torch 2.14 for a private functional API; Lightning's all_gather uses it too
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*", category=FutureWarning)
        fields = {
            name: torch.cat(all_gather(value.contiguous()), dim=0)
            for name, value in output.present().items()
            if name in LOSS_FIELDS
        }
    gathered = [torch.empty_like(labels) for _ in range(size)]
    dist.all_gather(gathered, labels.contiguous())
    return EmbeddingOutput(**fields), torch.cat(gathered)


def _all_gather_rows(tensor: Tensor) -> list[Tensor]:
    """Every rank's ``tensor`` (no gradient); the first dimension may differ between ranks."""
    device = _comm_device(tensor)
    t = tensor.to(device).contiguous()
    n = torch.tensor([len(t)], device=device)
    sizes = [torch.empty_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: len(t)] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return [o[: int(s.item())].to(tensor.device) for o, s in zip(out, sizes, strict=True)]


def gather_unique(
    values: Mapping[str, Tensor], index: Tensor, size: int | None = None, drop_missing: bool = False
) -> dict[str, Tensor]:
    """Rows of every rank placed at their data-set ``index`` (``(n,)`` int64, one per row).

    Returns ``{name: (size, ...)}`` in data-set order (``size`` default: the largest index + 1):
    items a sampler repeated to pad the shards land on the same row, so each item appears once.
    Raises a ValueError when some index in ``0 .. size - 1`` is on no rank, unless
    ``drop_missing`` (images skipped under ``data.on_bad_image: skip``): then those rows are left
    out and the rest keep data-set order.
    """
    index = torch.as_tensor(index, dtype=torch.long).cpu()
    if world()[0] > 1:
        index = torch.cat(_all_gather_rows(index))
        values = {name: torch.cat(_all_gather_rows(v)) for name, v in values.items()}
    size = int(index.max()) + 1 if size is None and len(index) else int(size or 0)
    seen = torch.zeros(size, dtype=torch.bool)
    seen[index] = True
    if not bool(seen.all()) and not drop_missing:
        raise ValueError(f"gather_unique: {int((~seen).sum())} of {size} items are on no rank")
    out = {}
    for name, v in values.items():
        placed = torch.empty((size, *v.shape[1:]), dtype=v.dtype, device=v.device)
        placed[index.to(v.device)] = v
        out[name] = placed if bool(seen.all()) else placed[seen.to(v.device)]
    return out


def eval_sampler(dataset: Dataset, num_replicas: int, rank: int) -> DistributedSampler | None:
    """Evaluation shards (no shuffling, padded to equal length), or None on one process."""
    if num_replicas <= 1:
        return None
    return DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)


def distributed_embed(
    model: torch.nn.Module,
    dataset: RetrievalDataset,
    *,
    fields: Sequence[str] = ("embedding",),
    **embed_kw,
) -> dict[str, Tensor]:
    """:func:`glassmetric.retrieval.embed.embed_fields` of ``dataset``, each rank embedding a
    shard; every rank gets the whole result, in data-set order (call it on every rank)."""
    from glassmetric.retrieval.embed import embed_fields

    size, rank = world()
    sampler = eval_sampler(dataset, size, rank)
    if sampler is None:
        return embed_fields(model, dataset, fields=fields, **embed_kw)
    indices = torch.tensor(list(sampler), dtype=torch.long)
    shard = Subset(dataset, indices.tolist())
    local = embed_fields(model, shard, fields=fields, **embed_kw)  # type: ignore[arg-type]  # embed_fields reads only len() and items
    local["index"] = indices[local["index"]]  # shard positions -> data-set positions
    # images skipped as unreadable (data.on_bad_image: skip) are on no rank: left out
    skip = _bad_image_policy(dataset) == "skip"
    return gather_unique(local, local["index"], len(dataset), drop_missing=skip)


def _bad_image_policy(dataset) -> str:
    """The ``on_bad_image`` policy of ``dataset``, looked up through wrappers (``.dataset``)."""
    while not hasattr(dataset, "on_bad_image") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return getattr(dataset, "on_bad_image", "error")


def device_count(devices: int | str, accelerator: str = "auto") -> int:
    """How many devices per node Lightning's ``devices`` asks for: an int, ``"auto"`` / ``"-1"``
    (every GPU, 1 on the CPU), a count ``"2"`` or a list ``"0,1"``."""
    if isinstance(devices, int):
        return torch.cuda.device_count() if devices == -1 else devices
    text = devices.strip()
    if text in ("auto", "-1"):
        return max(1, torch.cuda.device_count()) if accelerator not in ("cpu",) else 1
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    return int(text) if text.isdigit() else 1


def check_devices(t) -> None:
    """ConfigError naming the key when ``trainer.accelerator`` / ``trainer.devices`` (of the
    TrainerConfig ``t``) ask for devices this machine does not have."""
    from glassmetric.errors import ConfigError

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    kind = t.accelerator
    if kind == "auto":
        kind = "gpu" if gpus else "mps" if mps else "cpu"
    indices = isinstance(t.devices, str) and "," in t.devices
    if kind in ("gpu", "cuda"):
        if not gpus:
            raise ConfigError(
                f"trainer.accelerator: {t.accelerator!r}, but torch finds no CUDA GPU here: use cpu or auto"
            )
        if indices:
            missing = [i for i in (int(d) for d in t.devices.split(",") if d.strip()) if i >= gpus]
            if missing:
                raise ConfigError(f"trainer.devices: GPU {missing[0]} does not exist here (GPUs 0 to {gpus - 1})")
        elif t.devices != "auto" and int(t.devices) > gpus:
            raise ConfigError(f"trainer.devices: {t.devices} GPUs asked for, this machine has {gpus}")
    elif kind == "mps":
        if not mps:
            raise ConfigError(
                f"trainer.accelerator: {t.accelerator!r}, but torch finds no MPS device here: use cpu or auto"
            )
        if t.devices not in (1, "1", "auto"):
            raise ConfigError(f"trainer.devices: MPS has one device, got {t.devices!r}")
    elif indices:
        raise ConfigError(f"trainer.devices: GPU indices {t.devices!r} on the CPU: give a number of processes instead")


def ddp_strategy(cfg):
    """Lightning's strategy for ``cfg.trainer``: ``ddp`` / ``ddp_spawn`` (and ``auto`` with
    several devices or nodes: ``ddp``) as a ``DDPStrategy``, finding unused parameters where a
    head may get no gradient (:func:`has_extra_heads`); ``auto`` on one device as it is."""
    t = cfg.trainer
    strategy = t.strategy
    if strategy == "auto" and (device_count(t.devices, t.accelerator) > 1 or t.num_nodes > 1):
        strategy = "ddp"
    if strategy == "auto":
        return strategy
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(
        start_method="popen" if strategy == "ddp" else "spawn",
        find_unused_parameters=has_extra_heads(cfg),
    )


def has_extra_heads(cfg) -> bool:
    """Whether a model of ``cfg`` may hold parameters its loss leaves without gradient (the
    global head beside attention groups, a spatial or uncertainty head a global loss ignores),
    which DDP must be told to look for."""
    m = cfg.model
    return bool(m.groups or m.spatial_grid or m.uncertainty_dim)
