"""Exact resume, also from the middle of an epoch.

A resumed run repeats the uninterrupted one step for step when every random choice of a step
depends only on the seed and the step's position, never on what ran before in this process:

* the batch order is a function of (seed, epoch) (:class:`MPerClassBatchSampler`), and after
  a mid-epoch restart :class:`ResumableBatches` skips the batches already trained on, the
  count of which the :class:`ResumableLoader` stores in the checkpoint (Lightning saves and
  restores the state of a DataLoader that has ``state_dict`` / ``load_state_dict``);
* each image's augmentation is drawn from RNGs seeded by (seed, epoch, batch, slot)
  (:class:`SeededSamples`), whichever worker loads it and however many workers there are;
  "batch" is the batch's place in the sequence all DDP replicas share, so replicas draw
  different numbers;
* the main process's RNGs (dropout, mixup) are reseeded from (seed, epoch, batch) before
  every step (:class:`StepSeed`), the batch again counted in the shared sequence;
* the weights, optimizer, scheduler and loop counters are Lightning's checkpoint, written
  atomically every ``trainer.checkpoint_every_n_steps`` steps (:class:`StepCheckpoint`) and at
  the end of each epoch, the previous one kept as ``last.prev.ckpt``.

:func:`resume_checkpoint` picks the checkpoint to resume: ``last.ckpt``, or when that one is
unreadable (truncated, foreign) the previous one, with a message. Before anything is written,
:func:`check_resumed_model` and :func:`check_resumed_shapes` refuse a config whose model is not
the one the checkpoint was trained with, naming the keys and both values.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, cast

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, Sampler

from glassmetric.checkpoints import previous_path, safe_torch_load
from glassmetric.data.base import SizedDataset
from glassmetric.data.image_io import collate_training
from glassmetric.errors import CheckpointError


def derived_seed(*key: int) -> int:
    """A 32-bit seed that depends on every integer of ``key`` (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def replica_of(batches: EpochBatchSampler | Sampler) -> tuple[int, int]:
    """``(num_replicas, rank)`` of a batch sampler that splits one global sequence between
    replicas (:class:`~glassmetric.data.sampler.MPerClassBatchSampler`); ``(1, 0)`` otherwise."""
    return int(getattr(batches, "num_replicas", 1)), int(getattr(batches, "rank", 0))


class EpochBatchSampler(Protocol):
    """A batch sampler whose batch order is chosen by ``set_epoch``
    (:class:`~glassmetric.data.sampler.MPerClassBatchSampler`)."""

    @property
    def epoch(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[list[int]]: ...


class ResumableBatches(Sampler[list]):
    """Wraps a batch sampler with ``set_epoch`` / ``epoch``: yields each batch as a list of
    ``(index, sample_seed)`` pairs for :class:`SeededSamples`, and can start the current epoch
    at a later batch (:meth:`resume_at`) to continue it from its middle."""

    def __init__(self, batches: EpochBatchSampler, seed: int):
        self.batches = batches
        self.seed = seed
        self._resume: tuple[int, int] | None = None  # (epoch, first batch)

    @property
    def epoch(self) -> int:
        return self.batches.epoch

    def set_epoch(self, epoch: int) -> None:
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None  # a later epoch starts at its beginning
        self.batches.set_epoch(epoch)

    def resume_at(self, batch: int) -> None:
        """Iterations of the current epoch start at ``batch`` (torch's multi-worker loader
        calls ``iter`` twice per epoch, so this lasts until the epoch changes)."""
        self._resume = (self.epoch, int(batch))

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        return self._seeded(self.epoch, skip)

    def _seeded(self, epoch: int, skip: int) -> Iterator[list[tuple[int, int]]]:
        # seeds follow the batch's place in the global sequence all replicas share (replica
        # ``rank`` of ``W`` runs its batches ``rank::W``): every replica draws other numbers, and
        # an image's augmentation does not depend on how many processes train
        world, rank = replica_of(self.batches)
        for b, batch in enumerate(self.batches):
            if b >= skip:
                g = b * world + rank
                yield [(int(i), derived_seed(self.seed, epoch, g, slot)) for slot, i in enumerate(batch)]


class SeededSamples(Dataset):
    """``dataset[index]`` with the global RNGs seeded first by the key's sample seed."""

    def __init__(self, dataset: SizedDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        seed_all(seed)
        return self.dataset[index]


class ResumableLoader(DataLoader):
    """A training DataLoader over :class:`ResumableBatches` whose state (epoch, batches done,
    read from ``progress``) travels in Lightning's checkpoint and is restored on resume."""

    def __init__(self, *args, progress: Callable[[], int], **kwargs):
        super().__init__(*args, **kwargs)
        self._progress = progress

    @property
    def _batches(self) -> ResumableBatches:
        # DataLoader types batch_sampler loosely; this loader is always built over ResumableBatches
        return cast(ResumableBatches, self.batch_sampler)

    def state_dict(self) -> dict:
        return {"epoch": int(self._batches.epoch), "batches_done": int(self._progress())}

    def load_state_dict(self, state: dict) -> None:
        done = int(state.get("batches_done", 0))
        if int(state.get("epoch", -1)) == self._batches.epoch and 0 < done < len(self._batches):
            print(f"resuming epoch {self._batches.epoch} at batch {done} of {len(self._batches)}")
            self._batches.resume_at(done)


def resumable_train_loader(
    dataset: SizedDataset, batch_sampler: EpochBatchSampler, *, seed: int, num_workers: int, trainer: pl.Trainer | None
) -> ResumableLoader:
    """The training loader of ``fit``: seeded samples, resumable batches, unreadable images
    left out (``data.on_bad_image: skip``)."""

    def progress() -> int:
        # Lightning annotates batch_progress.current as _ReadyCompletedTracker; it holds a _ProcessedTracker
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0  # type: ignore[attr-defined]

    return ResumableLoader(
        SeededSamples(dataset),
        batch_sampler=ResumableBatches(batch_sampler, seed),
        num_workers=num_workers,
        collate_fn=collate_training,
        generator=torch.Generator(),
        progress=progress,
    )


def step_seed(seed: int, epoch: int, batch: int, world: int = 1, rank: int = 0) -> int:
    """The main process's seed for a training step: keyed, like the samples' seeds, by the
    step's batch in the global sequence (``batch * world + rank``), so replicas draw different
    dropout and mixup numbers and one process draws what replica 0 of many would for the
    same global batch."""
    return derived_seed(seed, epoch, batch * world + rank, 1)


class StepSeed(Callback):
    """Reseeds the global RNGs from (seed, epoch, batch) before every training step."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        seed_all(step_seed(self.seed, trainer.current_epoch, batch_idx, trainer.world_size, trainer.global_rank))


class StepCheckpoint(Callback):
    """Saves the trainer's checkpoint to ``path`` every ``every_n`` training steps; not after an
    epoch's last step, whose checkpoint is written after its validation."""

    def __init__(self, path: Path, every_n: int):
        self.path = Path(path)
        self.every_n = every_n

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        if self.every_n and trainer.global_step % self.every_n == 0 and not last_of_epoch:
            trainer.save_checkpoint(self.path, weights_only=False)


def resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from: ``last.ckpt``, else (unreadable: truncated, foreign,
    unsafe) ``last.prev.ckpt``, with a message; the unreadable one is moved aside as
    ``last.damaged.ckpt``. None when there is none; a CheckpointError when none is readable."""
    last = Path(ckpt_dir) / "last.ckpt"
    prev = previous_path(last)
    for stale in Path(ckpt_dir).glob(".*.tmp"):  # a write cut short by the crash
        stale.unlink(missing_ok=True)
    if not last.exists() and not prev.exists():
        return None
    problem = None
    for path in (last, prev):
        if not path.exists():
            continue
        try:
            ckpt = safe_torch_load(path)
            if not isinstance(ckpt, dict):
                raise CheckpointError(
                    f"cannot load checkpoint {path}: not a glassmetric checkpoint: the top level is a "
                    f"{type(ckpt).__name__}, not a mapping"
                )
            step = ckpt.get("global_step")
        except CheckpointError as e:
            problem = problem or e
            print(f"{e}: trying the previous checkpoint" if path == last else str(e))
            continue
        if path != last:
            reason = f"{last} is missing"
            if last.exists():  # keep it for a look, out of the way of the next checkpoint
                damaged = last.with_name("last.damaged.ckpt")
                last.replace(damaged)
                reason = f"{last} is unreadable (moved to {damaged.name})"
            print(f"{reason}: resuming from the previous checkpoint {path} (step {step})")
        return path
    raise CheckpointError(f"no readable checkpoint to resume in {ckpt_dir}: {problem}")


def discard_resume_checkpoints(ckpt_dir: Path) -> None:
    """A fresh start: remove the last checkpoints of an earlier run, so that a later
    ``--resume`` can never fall back to one of them (``--overwrite`` removes the rest of it too:
    :func:`glassmetric.training.run_folder.clear_previous_run`)."""
    last = Path(ckpt_dir) / "last.ckpt"
    for path in (last, previous_path(last), last.with_name("last.damaged.ckpt")):
        path.unlink(missing_ok=True)


def _flat(values: dict, prefix: str = "") -> dict:
    """``{"model": {"groups": 3}}`` -> ``{"model.groups": 3}`` (tuples as lists)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = _plain(value)
    return out


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _differences(keys, config: dict, stored: dict, limit: int = 6) -> str:
    listed = [
        f"{k} is {config.get(k, '(unset)')!r} in the config, {stored.get(k, '(unset)')!r} in the checkpoint"
        for k in keys
    ]
    more = f", and {len(listed) - limit} more" if len(listed) > limit else ""
    return "; ".join(listed[:limit]) + more


#: model keys a resumed run may change: the weights come from the checkpoint, not from them
RESUMABLE_MODEL_KEYS = ("model.pretrained",)


def check_resumed_model(cfg, path: Path, checkpoint: dict) -> None:
    """A CheckpointError naming every ``model.*`` key (but ``model.pretrained``) whose value in
    ``cfg`` differs from the config stored in ``checkpoint`` (read from ``path``), with both
    values: the checkpoint's weights, optimizer and loss state belong to the model they were
    trained with. Checkpoints without a stored config pass (see :func:`check_resumed_shapes`)."""
    stored = (
        checkpoint.get("glassmetric", {}).get("config") if isinstance(checkpoint.get("glassmetric"), dict) else None
    )
    if not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
        return
    mine, theirs = _flat(cfg.to_dict()), _flat({"model": stored["model"]})
    changed = [k for k in theirs if k not in RESUMABLE_MODEL_KEYS and k in mine and mine[k] != theirs[k]]
    if changed:
        raise CheckpointError(
            f"--resume: the config's model differs from the one {path} was trained with: "
            f"{_differences(changed, mine, theirs)}; resume with that run's config "
            f"(--config {Path(cfg.trainer.output_dir) / 'config.yaml'}) or start again with --overwrite"
        )


def check_resumed_shapes(cfg, path: Path, checkpoint: dict, module: torch.nn.Module) -> None:
    """A CheckpointError unless ``module``'s weights have the names and shapes of the
    checkpoint's (a changed loss or number of training classes changes them); it names the first
    weight that differs and the keys in which ``cfg`` differs from the stored config, outside
    ``trainer.*`` and ``eval.*``."""
    theirs = {k: tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items() if isinstance(v, torch.Tensor)}
    mine = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if mine == theirs:
        return
    name = next(k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k))

    def shape(shapes: dict[str, tuple[int, ...]]) -> str:
        return f"of shape {list(shapes[name])}" if name in shapes else "absent"

    why = ""
    stored = (
        checkpoint.get("glassmetric", {}).get("config") if isinstance(checkpoint.get("glassmetric"), dict) else None
    )
    if isinstance(stored, dict):
        a, b = _flat(cfg.to_dict()), _flat(stored)
        changed = [
            k for k in sorted(set(a) | set(b)) if not k.startswith(("trainer.", "eval.")) and a.get(k) != b.get(k)
        ]
        if changed:
            why = f" (the config differs from the checkpoint's: {_differences(changed, a, b)})"
    raise CheckpointError(
        f"--resume: {path} does not fit the config's model: the weight {name} is {shape(theirs)} in the checkpoint, "
        f"{shape(mine)} in the config's model{why}; resume with that run's config "
        f"(--config {Path(cfg.trainer.output_dir) / 'config.yaml'}) or start again with --overwrite"
    )
