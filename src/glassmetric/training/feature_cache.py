"""Training on cached features of the backbone's frozen first stages (``trainer.cache_features: V``).

When the first stages of the backbone do not train (``model.trainable_backbone`` with frozen
BatchNorm, as in the ``cub50`` preset), their output for an augmented image is the same at every
step. :func:`cached_training_set` computes it once for ``V`` augmented views of every training
image and training runs the rest of the network (:class:`~glassmetric.models.backbone_split.FrozenSplit`)
and every head and loss from it; an epoch then costs the trainable part only, without decoding
or augmenting images.

* **Views.** View ``v`` of training image ``i`` is the training transform applied under RNGs
  seeded by ``(seed, i, v)`` (:func:`training_view`), whatever the worker. Each epoch, every
  image is represented by one of its ``V`` views, drawn from torch's RNG as the uncached path
  draws its augmentations: seeded per sample from (seed, epoch, batch, slot)
  (:class:`~glassmetric.training.resume.SeededSamples`), so a resumed run draws the same views.
* **Storage.** On disk, ``trainer.output_dir/feature_cache.pt`` (or, with ``trainer.cache_dir``,
  ``feature_cache-<fingerprint>.pt`` there, shared by every run of that fingerprint), in float16 (half the bytes of
  float32; each value rounded by at most 5e-4 of itself), written atomically
  and read memory-mapped: the training process holds no copy, the operating system keeps the
  pages in its cache (a cache larger than the free memory still trains, from disk), and a
  resumed run, or a new run with other heads or losses, reuses it instead of recomputing it.
* **Validity.** The file holds a fingerprint of everything it depends on: the training images
  (labels, each file's path, size and modification time, or the data set's parameters for
  generated data), the transform, the frozen stages' weights and where the backbone is split,
  ``V``, the seed, and the torch / torchvision / Pillow versions. A file whose fingerprint
  differs is rebuilt; a run never trains on features of other data.
* **Equivalence.** The frozen stages are run as training runs them: BatchNorm layers in eval
  mode (they are frozen), no dropout. Losses and gradients therefore equal the uncached
  path's on the same views: to rounding with float32 features; float16 storage moves the loss
  by about 1e-5 and the gradient as much as noise of the same size in float32 features does
  (0.3-3 % in a tiny untrained network, against more than 100 % for another view).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

from glassmetric.config import Config
from glassmetric.data.base import RetrievalDataset
from glassmetric.data.image_io import collate_readable
from glassmetric.errors import DataError
from glassmetric.models.backbone_split import FrozenSplit
from glassmetric.outputs import atomic_write_with
from glassmetric.training.resume import derived_seed, seed_all
from glassmetric.training.run_folder import FEATURE_CACHE_FILE

__all__ = [
    "CachedTraining",
    "CachedViews",
    "FeatureCache",
    "build_features",
    "cache_fingerprint",
    "cached_training_set",
    "load_or_build_cache",
    "training_view",
]

#: bumped when the file's layout or the meaning of a view changes
_FORMAT = 1
#: keeps the views' seeds apart from the other seeds derived from the run's seed
_VIEW_STREAM = 0xCACE


def training_view(dataset: RetrievalDataset, index: int, view: int, seed: int) -> torch.Tensor | None:
    """View ``view`` of training image ``index``: ``dataset.transform`` under RNGs seeded by
    ``(seed, index, view)``; None for an unreadable image under ``data.on_bad_image: skip``."""
    sample = dataset.load_readable(index)
    if sample is None:
        return None
    return _view(dataset, sample.image, index, view, seed)


def _view(dataset: RetrievalDataset, image: Any, index: int, view: int, seed: int) -> torch.Tensor:
    seed_all(derived_seed(seed, _VIEW_STREAM, index, view))
    return dataset.transform(image) if dataset.transform is not None else image


class _ImageViews(Dataset):
    """Item ``i``: the ``V`` views of training image ``i``, decoded once."""

    def __init__(self, dataset: RetrievalDataset, views: int, seed: int):
        self.dataset, self.views, self.seed = dataset, views, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | None:
        sample = self.dataset.load_readable(index)
        if sample is None:
            return None
        views = [_view(self.dataset, sample.image, index, v, self.seed) for v in range(self.views)]
        return {"views": torch.stack(views), "index": index}


# ---------------------------------------------------------------------- fingerprint
def cache_fingerprint(split: FrozenSplit, dataset: RetrievalDataset, views: int, seed: int) -> str:
    """SHA-256 of everything the cached features depend on (see the module docstring)."""
    h = hashlib.sha256()

    def add(*parts: object) -> None:
        for part in parts:
            h.update(repr(part).encode())
            h.update(b"\0")

    add("glassmetric feature cache", _FORMAT, views, seed, torch.__version__, torchvision.__version__, PIL.__version__)
    add(split.backbone.name, [path for path, _ in split.frozen])
    for name, tensor in split.frozen_state():
        t = tensor.detach().cpu().reshape(-1).contiguous()
        add(name, str(t.dtype), tuple(tensor.shape))
        h.update(t.view(torch.uint8).numpy().tobytes())
    add(repr(dataset.transform))
    _describe(dataset, add, h, set())
    return h.hexdigest()


def _describe(obj: object, add: Any, h: Any, seen: set[int]) -> None:
    """Feed the data set ``obj`` into the hash: its parameters, arrays, nested data sets and the
    size and modification time of every file it names (not its transform, hashed apart)."""
    if isinstance(obj, (str, int, float, bool, type(None))):
        add(obj)
    elif isinstance(obj, Path):
        try:
            st = obj.stat()
            add(str(obj), st.st_size, st.st_mtime_ns)
        except OSError:
            add(str(obj), "missing")
    elif isinstance(obj, np.ndarray):
        add(obj.dtype.str, obj.shape)
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, torch.Tensor):
        _describe(obj.detach().cpu().numpy(), add, h, seen)
    elif isinstance(obj, (list, tuple)):
        add(type(obj).__name__, len(obj))
        for item in obj:
            _describe(item, add, h, seen)
    elif isinstance(obj, dict):
        add("dict", len(obj))
        for key in sorted(obj, key=repr):
            add(key)
            _describe(obj[key], add, h, seen)
    elif isinstance(obj, Dataset) and id(obj) not in seen:
        seen.add(id(obj))
        add(type(obj).__qualname__)
        for key, value in sorted(vars(obj).items()):
            if key != "transform" and not key.startswith("_"):
                add(key)
                _describe(value, add, h, seen)
    else:
        add(type(obj).__qualname__)


# ---------------------------------------------------------------------- building
@torch.no_grad()
def build_features(
    split: FrozenSplit,
    dataset: RetrievalDataset,
    *,
    views: int,
    seed: int,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, V, C, h, w), present (N,))``: the frozen stages' output for every view of
    every image of ``dataset`` (zeros and ``present[i] = False`` for an unreadable image skipped
    under ``data.on_bad_image: skip``). The global RNGs are left as they were."""
    loader = DataLoader(
        _ImageViews(dataset, views, seed),
        batch_size=max(1, batch_size // views),
        num_workers=num_workers,
        collate_fn=collate_readable,
    )
    n = len(dataset)
    present = torch.zeros(n, dtype=torch.bool)
    features: torch.Tensor | None = None
    device = torch.device(device)
    homes = [(module, _device_of(module)) for _, module in split.frozen]
    with _preserved_rngs():
        try:
            for module, _ in homes:
                module.to(device)
            for batch in loader:
                if "views" not in batch:
                    continue
                b = batch["views"].shape[0]
                out = split.frozen_features(batch["views"].flatten(0, 1).to(device))
                out = out.unflatten(0, (b, views)).to("cpu", dtype)
                if not torch.isfinite(out).all():
                    raise DataError(
                        f"trainer.cache_features: the frozen stages' output does not fit in {dtype} "
                        f"(non-finite values for images {batch['index'][:5].tolist()})"
                    )
                if features is None:
                    features = torch.zeros((n, views, *out.shape[2:]), dtype=dtype)
                features[batch["index"]] = out
                present[batch["index"]] = True
        finally:
            for module, home in homes:
                module.to(home)
    if features is None:
        raise DataError("trainer.cache_features: no training image could be read")
    return features, present


def _device_of(module: torch.nn.Module) -> torch.device:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextmanager
def _preserved_rngs() -> Iterator[None]:
    """Restore python's, numpy's and torch's (CPU) global RNGs on exit: the views reseed them."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


# ---------------------------------------------------------------------- the file
@dataclass
class FeatureCache:
    """Cached features (memory-mapped from ``path``) and how they came to be."""

    features: torch.Tensor  # (N, V, C, h, w)
    present: torch.Tensor  # (N,) bool
    path: Path
    reused: bool
    #: seconds spent computing and writing the cache (0 when reused)
    build_seconds: float = 0.0


def load_or_build_cache(
    path: str | Path,
    split: FrozenSplit,
    dataset: RetrievalDataset,
    *,
    views: int,
    seed: int,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
) -> FeatureCache:
    """The cache at ``path`` when its fingerprint is this one, else a new one written there
    atomically (a temporary file renamed over it)."""
    path = Path(path)
    fingerprint = cache_fingerprint(split, dataset, views, seed)
    stored = _read(path)
    if stored is not None and stored.get("fingerprint") == fingerprint and stored["features"].dtype == dtype:
        print(f"feature cache: reusing {path}")
        return FeatureCache(stored["features"], stored["present"], path, reused=True)
    if stored is not None:
        print(f"feature cache: {path} holds other features (data, transform, weights, views or seed changed)")
    del stored
    print(
        f"feature cache: computing the output of {split.boundary} for {views} view(s) of "
        f"{len(dataset)} training images (once) ..."
    )
    start = time.perf_counter()
    features, present = build_features(
        split,
        dataset,
        views=views,
        seed=seed,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        dtype=dtype,
    )
    _atomic_save({"fingerprint": fingerprint, "features": features, "present": present}, path)
    del features, present
    stored = _read(path)
    assert stored is not None
    seconds = time.perf_counter() - start
    size = path.stat().st_size / 2**20
    print(f"feature cache: {path} written in {seconds:.0f} s ({size:,.0f} MiB, {dtype})")
    return FeatureCache(stored["features"], stored["present"], path, reused=False, build_seconds=seconds)


def _read(path: Path) -> dict | None:
    """The cache file memory-mapped, or None when it is absent or unreadable (then rebuilt)."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, foreign: rebuilt
        print(f"feature cache: {path} is unreadable ({type(e).__name__}): rebuilding it")
        return None
    if not isinstance(stored, dict) or not {"fingerprint", "features", "present"} <= stored.keys():
        return None
    return stored


def _atomic_save(obj: dict, path: Path) -> None:
    """``torch.save`` streamed into a temporary file beside ``path`` and renamed over it
    (:func:`~glassmetric.outputs.atomic_write_with`): the tensors are written as they are,
    without a second copy in memory."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a run that was killed
        stale.unlink(missing_ok=True)
    atomic_write_with(path, lambda f: torch.save(obj, f))


# ---------------------------------------------------------------------- training
class CachedViews(Dataset):
    """The training split as cached features: item ``i`` is one of image ``i``'s ``V`` views,
    drawn from torch's global RNG (seeded per sample by
    :class:`~glassmetric.training.resume.SeededSamples`, as augmentations are)."""

    def __init__(self, features: torch.Tensor, present: torch.Tensor, labels: np.ndarray):
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} cached images for {len(labels)} labels")
        self.features, self.present, self.labels = features, present, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict | None:
        if not bool(self.present[index]):
            return None  # unreadable, skipped (data.on_bad_image: skip)
        view = int(torch.randint(self.features.shape[1], ()))
        return {"features": self.features[index, view], "label": int(self.labels[index]), "index": int(index)}


@dataclass
class CachedTraining:
    """What ``fit`` trains from when ``trainer.cache_features`` is on."""

    split: FrozenSplit
    dataset: CachedViews
    cache: FeatureCache


def cached_training_set(cfg: Config, split: FrozenSplit, train: RetrievalDataset, out: Path) -> CachedTraining:
    """The cache of ``cfg.trainer.cache_features`` views of ``train`` in ``out`` (loaded, or built
    when it does not fit) for the model whose backbone ``split`` (:func:`split_frozen`) cuts."""
    accelerator = cfg.trainer.accelerator
    device = "cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"
    path = out / FEATURE_CACHE_FILE
    if cfg.trainer.cache_dir:  # shared by runs of the same fingerprint, side by side with others
        fingerprint = cache_fingerprint(split, train, cfg.trainer.cache_features, cfg.seed)
        path = Path(cfg.trainer.cache_dir).expanduser() / f"feature_cache-{fingerprint[:20]}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
    cache = load_or_build_cache(
        path,
        split,
        train,
        views=cfg.trainer.cache_features,
        seed=cfg.seed,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers,
        device=device,
    )
    return CachedTraining(split, CachedViews(cache.features, cache.present, train.labels), cache)
