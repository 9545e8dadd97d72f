"""Checkpoint files: the one format ``glassmetric fit`` writes, written atomically, read safely.

A checkpoint is a ``torch.save`` mapping with ``state_dict`` (the weights, ``model.*`` for the
embedding model) and ``glassmetric`` (:func:`checkpoint_metadata`: the package version and the
resolved config). It is written to a temporary file in the same folder, flushed and fsync'ed,
then renamed over the target (``os.replace`` is atomic on POSIX), and the folder is fsync'ed: a
crash leaves either the old checkpoint or the new one, never a truncated file. The file gets
the mode the umask gives, like any other the commands write. With ``keep_previous`` the
checkpoint it replaces stays beside it as ``<name>.prev.ckpt`` (a hard link, so no copy).
Reading never executes pickled code (``torch.load(weights_only=True)``): a checkpoint that holds
anything but tensors and plain containers is refused. :func:`load_trained` rebuilds the model.

The weights-only format (:func:`save_weights`, ``glassmetric export --format weights``) is a
safetensors file of the embedding model's weights (no optimizer state, no ``model.`` prefix)
whose metadata holds the same version and config under ``glassmetric`` (as JSON);
:func:`load_trained` reads it too.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from glassmetric.config import Config, config_from_dict
from glassmetric.errors import CheckpointError, ConfigError
from glassmetric.factory import build_model_from_config
from glassmetric.outputs import atomic_write

if TYPE_CHECKING:
    from glassmetric.models.embedding_model import EmbeddingModel

__all__ = [
    "atomic_torch_save",
    "checkpoint_metadata",
    "is_weights_file",
    "load_trained",
    "previous_path",
    "safe_torch_load",
    "save_weights",
]

#: the key of a checkpoint that holds glassmetric's metadata (version and config)
METADATA_KEY = "glassmetric"
#: the prefix of the embedding model's weights in ``state_dict``
MODEL_PREFIX = "model."


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

#: the first bytes of files people mistake for a checkpoint, and what to call them
_FOREIGN_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"BM": "a BMP image",
    b"RIFF": "a RIFF file (WebP image, WAV, ...)",
    b"%PDF": "a PDF document",
    b"\x08": "an ONNX model (or another protobuf)",
    b"{": "a JSON file",
}


def _file_kind(path: Path) -> str:
    """What ``path`` holds, from its bytes (parsed, never unpickled): ``zip`` (torch's format,
    maybe cut short), ``pickle`` (pickle opcodes up to a STOP, or past the scanned length),
    ``cut`` (pickle opcodes that stop short) or ``other`` (neither, or a known foreign format
    such as an image)."""
    with open(path, "rb") as f:
        head = f.read(_SCAN_BYTES)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if _foreign_format(head):
        return "other"
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
            with open(path, "rb") as f:
                what = _foreign_format(f.read(8)) or "neither a zip archive nor a pickle"
            raise CheckpointError(f"cannot load checkpoint {path}: not a PyTorch checkpoint ({what})") from e
        culprit = re.search(r"GLOBAL [\w.]+|Unsupported operand \S+", str(e))
        if isinstance(e, pickle.UnpicklingError) and (
            kind != "cut" or (culprit and culprit.group(0).startswith("GLOBAL"))
        ):
            # the weights-only unpickler met a class or function: loading it could run any code
            detail = f" ({culprit.group(0).strip()})" if culprit else ""
            raise CheckpointError(
                f"refused to load checkpoint {path}: it holds pickled objects beyond tensors and plain "
                f"containers{detail}, which could run code; glassmetric loads weights only"
            ) from e
        first = str(e).splitlines()[0].split(". ")[0] if str(e) else ""
        raise CheckpointError(
            f"cannot load checkpoint {path} (truncated or not a checkpoint): {type(e).__name__}: {first}"
        ) from e


def _foreign_format(head: bytes) -> str | None:
    """What a file starting with ``head`` is when its magic number is a known non-checkpoint format."""
    return next((name for magic, name in _FOREIGN_MAGIC.items() if head.startswith(magic)), None)


def is_weights_file(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file (an 8-byte header length, then a JSON header)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100 << 20


def save_weights(model: torch.nn.Module, cfg: Config, path: str | Path) -> int:
    """Write ``model``'s weights and ``cfg`` to ``path`` as safetensors, atomically; return its size
    in bytes. The config and package version are the metadata entry ``glassmetric`` (JSON)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    data = save(tensors, metadata={METADATA_KEY: json.dumps(checkpoint_metadata(cfg))})
    atomic_write(Path(path), data)
    return len(data)


def _weights_file_parts(path: Path) -> tuple[dict, dict]:
    """The stored config and the (``model.``-prefixed) weights of a :func:`save_weights` file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weights = {MODEL_PREFIX + k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot load weights file {path} (truncated or damaged): {e}") from e
    try:
        stored = json.loads(meta[METADATA_KEY])["config"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"cannot load weights file {path}: no glassmetric config in its metadata (a safetensors file "
            "that `glassmetric export --format weights` did not write)"
        ) from None
    if not isinstance(stored, dict):
        raise CheckpointError(f"cannot load weights file {path}: its stored config is not a mapping")
    return stored, weights


def checkpoint_metadata(cfg: Config) -> dict:
    """What a checkpoint stores beside its weights, under :data:`METADATA_KEY`: the package
    version and the resolved config (so :func:`load_trained` can rebuild the model)."""
    from glassmetric import __version__

    return {"version": __version__, "config": cfg.to_dict()}


def _checkpoint_parts(ckpt, path) -> tuple[dict, dict]:
    """The stored config (a copy) and the weights of a ``glassmetric fit`` checkpoint;
    CheckpointError saying what is wrong with anything else torch can load."""

    def foreign(what: str) -> CheckpointError:
        return CheckpointError(f"cannot load checkpoint {path}: not a glassmetric checkpoint: {what}")

    def kind(v) -> str:
        return type(v).__name__

    if not isinstance(ckpt, dict):
        raise foreign(f"the top level is a {kind(ckpt)}, not a mapping")
    if "state_dict" not in ckpt or not isinstance(ckpt.get(METADATA_KEY), dict) or "config" not in ckpt[METADATA_KEY]:
        raise foreign(f"no 'state_dict' and 'glassmetric' config (its keys: {', '.join(map(str, list(ckpt)[:8]))})")
    weights, stored = ckpt["state_dict"], ckpt[METADATA_KEY]["config"]
    if not isinstance(weights, dict):
        raise foreign(f"'state_dict' is a {kind(weights)}, not a mapping of tensors")
    bad = next((k for k, v in weights.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise foreign(f"'state_dict' entry {bad!r} is a {kind(weights[bad])}, not a tensor")
    if not isinstance(stored, dict):
        raise foreign(f"the 'glassmetric' config is a {kind(stored)}, not a mapping")
    if not isinstance(stored.get("model", {}), dict):
        raise foreign(f"the stored config's 'model' is a {kind(stored.get('model'))}, not a mapping")
    return dict(stored), weights


def load_trained(path: str | Path, overrides: Sequence[str] = ()) -> tuple[EmbeddingModel, Config]:
    """The EmbeddingModel and Config stored in a ``glassmetric fit`` checkpoint (weights only) or
    in a weights-only file (:func:`save_weights`).

    ``overrides`` change the stored config (e.g. ``data.root=...`` to evaluate elsewhere);
    model keys cannot be overridden, since the weights were trained with them.
    """
    fixed = [o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0].startswith("model.")]
    if fixed:
        raise ConfigError(
            f"{fixed[0]}: model.* keys cannot be overridden at evaluation: they are fixed by the checkpoint"
        )
    path = Path(path)
    if path.is_file() and is_weights_file(path):
        stored, weights = _weights_file_parts(path)
    else:
        stored, weights = _checkpoint_parts(safe_torch_load(path), path)
    stored["model"] = {**stored.get("model", {}), "pretrained": False}  # the checkpoint holds the weights
    try:
        config_from_dict(stored)
    except ConfigError as e:
        raise CheckpointError(f"cannot load checkpoint {path}: its stored config is invalid: {e}") from e
    cfg = config_from_dict(stored, overrides)
    model = build_model_from_config(cfg)
    prefix = MODEL_PREFIX
    state = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    expected = model.state_dict()
    misfit = next((k for k, v in state.items() if k in expected and v.shape != expected[k].shape), None)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if misfit or missing or unexpected:
        m = cfg.model
        if misfit:
            what = (
                f"{prefix}{misfit} is {tuple(state[misfit].shape)} in the file, "
                f"{tuple(expected[misfit].shape)} in the model of the config"
            )
        else:
            what = f"missing {[prefix + k for k in missing[:5]]}, unexpected {[prefix + k for k in unexpected[:5]]}"
        raise CheckpointError(
            f"cannot load checkpoint {path}: the stored config (model.backbone {m.backbone}, model.embedding_dim "
            f"{m.embedding_dim}) does not fit the weights: {what}"
        )
    model.load_state_dict(state)
    model.eval()
    return model, cfg
