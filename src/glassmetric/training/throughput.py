"""Where training time goes: images per second and the share of each step spent waiting for data.

The wait of a step is the time from the end of the previous step to the start of this one
(the DataLoader producing the batch); the compute is from its start to its end. A data-wait
share well above 10% means the input pipeline does not keep up (more workers, smaller images).
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class ThroughputMonitor(Callback):
    def __init__(self) -> None:
        self.wait = self.compute = 0.0  # seconds in the current epoch
        self.images = 0
        self.epoch_seconds: list[float] = []  # wall time of each finished epoch
        self._start = self._epoch_start = 0.0
        self._last_end: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._last_end = time.perf_counter()
        self.wait = self.compute = 0.0
        self.images = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()
        if self._last_end is not None:
            self.wait += self._start - self._last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_end = time.perf_counter()
        self.compute += self._last_end - self._start
        self.images += len(batch["label"])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = self.wait + self.compute
        self.epoch_seconds.append(time.perf_counter() - self._epoch_start)
        if total > 0:
            pl_module.log_dict(
                {"perf/data_wait_share": self.wait / total, "perf/train_images_per_s": self.images / total},
                on_epoch=True,
            )

    @property
    def data_wait_share(self) -> float:
        total = self.wait + self.compute
        return self.wait / total if total else 0.0
