"""The m-per-class batch sampler: every batch holds batch_size / m classes with m images each."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from glassmetric.errors import ConfigError


class MPerClassBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of ``batch_size // m`` distinct classes times ``m`` images of each.

    Classes are visited in shuffled rounds, each class once per round, so all classes are
    sampled equally often. A class's ``m`` images are drawn without replacement; a class with
    fewer than ``m`` images contributes all of them plus random repeats.

    Epoch length: the global sequence has ``G = len(labels) // batch_size`` batches (ceil with
    ``drop_last=False``), so an epoch sees about as many images as the data set holds. Each of
    the ``num_replicas`` replicas takes the batches ``rank::num_replicas`` of that same sequence,
    so ``len(sampler) = G // num_replicas`` (ceil with ``drop_last=False``, the global sequence
    then growing to fill every replica). All replicas run the same number of steps on disjoint
    batches. The sequence is a function of ``(seed, epoch)`` only: call ``set_epoch`` before
    each epoch (for an exact resume, with the same epoch).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        m: int,
        batch_size: int,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = True,
    ):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ConfigError(f"labels must be a non-empty 1-D sequence, got shape {labels.shape}")
        if m < 1 or batch_size < 1 or batch_size % m != 0:
            raise ConfigError(f"batch_size must be a positive multiple of m, got batch_size={batch_size}, m={m}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas, got num_replicas={num_replicas}, rank={rank}"
            )
        if seed < 0:
            raise ConfigError(f"seed must be non-negative, got {seed}")
        classes, inverse = np.unique(labels, return_inverse=True)
        self.classes_per_batch = batch_size // m
        if len(classes) < self.classes_per_batch:
            raise ConfigError(
                f"batch_size={batch_size} with m={m} needs {self.classes_per_batch} classes per batch, "
                f"but the labels hold only {len(classes)} classes"
            )
        if drop_last:
            self.num_batches = len(labels) // batch_size // num_replicas
        else:
            self.num_batches = math.ceil(math.ceil(len(labels) / batch_size) / num_replicas)
        if self.num_batches == 0:
            raise ConfigError(
                f"{len(labels)} images make no full batch of batch_size={batch_size} per replica "
                f"(num_replicas={num_replicas}); lower batch_size or set drop_last=False"
            )
        order = np.argsort(inverse, kind="stable")
        self._class_indices = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
        self.m = m
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batch order the next iteration yields."""
        if epoch < 0:
            raise ConfigError(f"epoch must be non-negative, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._global_batches(self.num_batches * self.num_replicas)
        return iter(batches[self.rank :: self.num_replicas])

    def _global_batches(self, count: int) -> list[list[int]]:
        """The first ``count`` batches of this epoch's sequence, the same on every replica."""
        rng = np.random.default_rng([self.seed, self.epoch])
        k, m = self.classes_per_batch, self.m
        upcoming = np.zeros(0, dtype=np.int64)
        batches = []
        for _ in range(count):
            if len(upcoming) < k:
                # a new round: the leftovers of this one first, then the other classes shuffled
                fresh = rng.permutation(len(self._class_indices))
                upcoming = np.concatenate([upcoming, fresh[~np.isin(fresh, upcoming)]])
            chosen, upcoming = upcoming[:k], upcoming[k:]
            batch = []
            for c in chosen:
                members = self._class_indices[c]
                n = len(members)
                if n >= m:
                    picks = rng.choice(n, m, replace=False)
                else:
                    picks = np.concatenate([rng.permutation(n), rng.integers(0, n, m - n)])
                batch += members[picks].tolist()
            batches.append(batch)
        return batches
