"""What :meth:`glassmetric.Retriever.embed` returns: every embedding the model gives for a set of
images, with their labels, data-set positions and file paths; saved to and read from ``.npz``."""

from __future__ import annotations

import io
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from glassmetric.outputs import atomic_write

__all__ = ["TENSOR_FIELDS", "Embeddings"]

#: the embedding fields, by the names of :class:`glassmetric.models.EmbeddingOutput`
TENSOR_FIELDS = ("embedding", "local", "group_embeddings", "attention", "uncertainty")


@dataclass
class Embeddings:
    """Row ``i`` of every field is one image. Fields the model does not give are None.

    embedding:        (N, D) L2-normalised global embedding; search ranks by its cosine.
    local:            (N, g*g, D) L2-normalised cell embeddings (structural matching).
    group_embeddings: (N, k, D/k) per-group embeddings (attentive grouping).
    attention:        (N, k, h, w) each group's attention map (attentive grouping).
    uncertainty:      (N, Du) uncertainty embedding (introspective similarity); ``||u||`` is
                      the image's uncertainty.
    labels:           (N,) int64 class labels (0 for unlabelled images).
    positions:        (N,) int64 position of each row's image in the embedded data set
                      (images skipped as unreadable under ``data.on_bad_image: skip`` have no row).
    paths:            the image file of each row, when the images came from files.
    """

    embedding: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    local: torch.Tensor | None = None
    group_embeddings: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    uncertainty: torch.Tensor | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.embedding)

    @property
    def fields(self) -> tuple[str, ...]:
        """The embedding fields present, in :data:`TENSOR_FIELDS` order."""
        return tuple(name for name in TENSOR_FIELDS if getattr(self, name) is not None)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The present fields plus ``labels`` and ``index`` (the positions), the mapping of
        :func:`glassmetric.retrieval.embed.embed_fields`."""
        out = {name: getattr(self, name) for name in self.fields}
        out["labels"], out["index"] = self.labels, self.positions
        return out

    def select(self, rows) -> Embeddings:
        """The rows ``rows`` (indices or a boolean mask) of every field."""
        rows = torch.as_tensor(rows)
        picked = rows.nonzero().flatten().tolist() if rows.dtype == torch.bool else rows.flatten().tolist()
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in (*TENSOR_FIELDS, "labels", "positions"):
            if kw[name] is not None:
                kw[name] = kw[name][rows]
        if self.paths is not None:
            kw["paths"] = [self.paths[i] for i in picked]
        return Embeddings(**kw)

    def to(self, device: str | torch.device) -> Embeddings:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in self.fields:
            kw[name] = kw[name].to(device)
        return Embeddings(**kw)

    def save_npz(self, path: str | Path) -> Path:
        """Write an ``.npz`` with one array per present field, ``labels``, ``positions`` and
        (when known) ``paths``; :meth:`load_npz` reads it back."""
        arrays = {name: getattr(self, name).float().cpu().numpy() for name in self.fields}
        arrays["labels"] = self.labels.cpu().numpy().astype(np.int64)
        arrays["positions"] = self.positions.cpu().numpy().astype(np.int64)
        if self.paths is not None:
            arrays["paths"] = np.asarray(self.paths, dtype=str)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path = Path(path)
        atomic_write(path, buffer.getbuffer())
        return path

    @classmethod
    def load_npz(cls, path: str | Path) -> Embeddings:
        with np.load(path, allow_pickle=False) as data:
            kw = {
                name: torch.from_numpy(data[name]) for name in (*TENSOR_FIELDS, "labels", "positions") if name in data
            }
            paths = data["paths"].tolist() if "paths" in data else None
        return cls(**kw, paths=paths)
