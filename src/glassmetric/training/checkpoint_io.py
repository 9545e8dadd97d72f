"""Lightning's checkpoint IO with glassmetric's atomic writes and weights-only reads
(:mod:`glassmetric.checkpoints`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from glassmetric.checkpoints import atomic_torch_save, safe_torch_load

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose writes are atomic and whose reads are weights-only; the
    files named in ``keep_previous`` keep their previous version (``last.prev.ckpt``)."""

    def __init__(self, keep_previous: tuple[str, ...] = ("last.ckpt",)):
        super().__init__()
        self.keep_previous = tuple(keep_previous)

    def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path, keep_previous=Path(path).name in self.keep_previous)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return safe_torch_load(path, map_location=map_location or "cpu")
