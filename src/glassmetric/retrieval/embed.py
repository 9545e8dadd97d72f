"""Embed a data set with a model, in evaluation mode, batch by batch."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from glassmetric.data.base import RetrievalDataset


@torch.inference_mode()
def embed_dataset(
    model: torch.nn.Module,
    dataset: RetrievalDataset,
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (N, D) float32 on CPU, labels (N,) int64) in data set order."""
    was_training = model.training
    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="embedding", unit="batch", leave=False)
    embeddings, labels = [], []
    for batch in loader:
        output = model(batch["image"].to(device, non_blocking=True))
        embeddings.append(output.embedding.float().cpu())
        labels.append(batch["label"])
    model.train(was_training)
    if not embeddings:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(embeddings), torch.cat(labels).long()
