"""Embed a data set with a model, in evaluation mode, batch by batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields as dataclass_fields

import torch
from torch.utils.data import DataLoader

from glassmetric.data.base import IndexedDataset, RetrievalDataset
from glassmetric.data.image_io import collate_readable, log
from glassmetric.models.output import EmbeddingOutput

__all__ = ["OUTPUT_FIELDS", "embed_dataset", "embed_fields"]

#: Names of the :class:`EmbeddingOutput` fields :func:`embed_fields` can collect.
OUTPUT_FIELDS = tuple(f.name for f in dataclass_fields(EmbeddingOutput))


@torch.inference_mode()
def embed_fields(
    model: torch.nn.Module,
    dataset: RetrievalDataset,
    *,
    fields: Sequence[str] = ("embedding", "local"),
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Several :class:`EmbeddingOutput` fields of every image, in data set order.

    Returns a dict with one CPU tensor per name in ``fields`` (e.g. ``"embedding"`` (N, D) and
    ``"local"`` (N, g*g, D)), cast to ``dtype`` (float32 by default; float16 halves the memory
    of large local embeddings), plus ``"labels"`` (N,) int64 and ``"index"`` (N,) int64, the
    position in ``dataset`` of each embedded image. The model runs in eval mode and
    its training flag is restored. A field the model does not produce (None in its output,
    e.g. ``"local"`` without a spatial head) raises a ValueError naming it. For an empty data
    set every field is a ``(0, 0)`` tensor. Images skipped as unreadable (``data.on_bad_image:
    skip``) are left out (``"index"`` then says which images the rows are), and counted in a
    logged warning.
    """
    fields = tuple(fields)
    if not fields:
        raise ValueError("fields must name at least one EmbeddingOutput field")
    unknown = sorted(set(fields) - set(OUTPUT_FIELDS))
    if unknown:
        raise ValueError(f"unknown output field(s) {unknown}; EmbeddingOutput has {list(OUTPUT_FIELDS)}")
    if len(set(fields)) != len(fields):
        raise ValueError(f"fields repeats a name: {list(fields)}")

    was_training = model.training
    model.eval().to(device)
    loader = DataLoader(
        IndexedDataset(dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_readable,
    )
    iterator = iter(loader)
    batches = iterator
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(iterator, total=len(loader), desc="embedding", unit="batch", leave=False)
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in fields}
    labels, positions = [], []
    skipped = 0
    try:
        for batch in batches:
            skipped += int(batch["skipped"])
            if "image" not in batch:  # every image of the batch unreadable (data.on_bad_image: skip)
                continue
            output = model(batch["image"].to(device, non_blocking=True))
            for name in fields:
                value = getattr(output, name)
                if value is None:
                    raise ValueError(
                        f"the model's output has no {name!r} field (fields it sets: "
                        f"{sorted(output.present())}); add the head that produces it"
                    )
                collected[name].append(value.to(dtype).cpu())
            labels.append(batch["label"])
            positions.append(batch["index"])
    finally:
        model.train(was_training)
        # stop the workers now, also after an error (left to the garbage collector, their
        # shutdown can wait seconds)
        getattr(iterator, "_shutdown_workers", lambda: None)()
    if skipped:
        log.warning("embedding: skipped %d unreadable image(s) of %d (data.on_bad_image: skip)", skipped, len(dataset))
    if not labels:
        out = {name: torch.zeros(0, 0, dtype=dtype) for name in fields}
        out["labels"] = torch.zeros(0, dtype=torch.long)
        out["index"] = torch.zeros(0, dtype=torch.long)
        return out
    out = {name: torch.cat(values) for name, values in collected.items()}
    out["labels"] = torch.cat(labels).long()
    out["index"] = torch.cat(positions).long()
    return out


def embed_dataset(
    model: torch.nn.Module,
    dataset: RetrievalDataset,
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (N, D) float32 on CPU, labels (N,) int64) in data set order.

    The global embeddings only; :func:`embed_fields` collects other output fields too.
    """
    out = embed_fields(
        model,
        dataset,
        fields=("embedding",),
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=progress,
    )
    return out["embedding"], out["labels"]
