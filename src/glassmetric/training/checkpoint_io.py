"""Atomic checkpoint writes and safe checkpoint reads.

A checkpoint is written to a temporary file in the same folder, flushed and fsync'ed, then
renamed over the target (``os.replace`` is atomic on POSIX), and the folder is fsync'ed: a crash
leaves either the old checkpoint or the new one, never a truncated file. The file gets the mode
the umask gives, like any other the commands write. With ``keep_previous`` the checkpoint it
replaces stays beside it as ``<name>.prev.ckpt`` (a hard link, so no copy), for when the
newest one is damaged after all (a full disk, a copy cut short): see
:func:`glassmetric.training.resume.resume_checkpoint`. Reading never executes pickled code
(``torch.load(weights_only=True)``): a checkpoint that holds anything but tensors and plain
containers is refused.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from glassmetric.errors import CheckpointError
from glassmetric.outputs import atomic_write


def previous_path(path: str | Path) -> Path:
    """Where ``keep_previous`` keeps the checkpoint that ``path`` replaced: ``last.prev.ckpt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _keep_previous(path: Path) -> None:
    """Hard-link (or, where links fail, copy) ``path`` to its previous_path, atomically."""
    prev = previous_path(path)
    tmp = path.with_name(f".{prev.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, prev)


def atomic_torch_save(obj: Any, path: str | Path, keep_previous: bool = False) -> None:
    """``torch.save`` to ``path`` atomically (:func:`glassmetric.outputs.atomic_write`: temporary
    file, fsync, rename, fsync folder; the umask's mode); with ``keep_previous``, the file it
    replaces becomes ``previous_path(path)``."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)

    def keep() -> None:
        if keep_previous and path.is_file():
            _keep_previous(path)

    atomic_write(path, buffer.getbuffer(), before_replace=keep)


#: how much of a file torch could not load is parsed to tell what it is
_SCAN_BYTES = 64 << 20


def _file_kind(path: Path) -> str:
    """What ``path`` holds, from its bytes (parsed, never unpickled): ``zip`` (torch's format,
    maybe cut short), ``pickle`` (pickle opcodes up to a STOP, or past the scanned length),
    ``cut`` (pickle opcodes that stop short) or ``other`` (neither)."""
    with open(path, "rb") as f:
        head = f.read(_SCAN_BYTES)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    try:
        for _ in pickletools.genops(io.BytesIO(head)):
            pass
    except ValueError as e:
        if "unknown" in str(e):
            return "other"
        return "pickle" if len(head) == _SCAN_BYTES else "cut"
    return "pickle"


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint without unpickling arbitrary objects; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot load checkpoint {path}: the file is empty (0 bytes)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        kind = _file_kind(path)
        if kind == "other":
            raise CheckpointError(f"cannot load checkpoint {path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)") from e
        culprit = re.search(r"GLOBAL [\w.]+|Unsupported operand \S+", str(e))
        if isinstance(e, pickle.UnpicklingError) and (kind != "cut" or (culprit and culprit.group(0).startswith("GLOBAL"))):
            # the weights-only unpickler met a class or function: loading it could run any code
            detail = f" ({culprit.group(0).strip()})" if culprit else ""
            raise CheckpointError(
                f"refused to load checkpoint {path}: it holds pickled objects beyond tensors and plain "
                f"containers{detail}, which could run code; glassmetric loads weights only"
            ) from e
        first = str(e).splitlines()[0].split(". ")[0] if str(e) else ""
        raise CheckpointError(f"cannot load checkpoint {path} (truncated or not a checkpoint): {type(e).__name__}: {first}") from e


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
