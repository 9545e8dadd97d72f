"""Guards of the training loop: non-finite losses and gradients, and skipped images.

:class:`NonFiniteGuard` checks the loss before the backward pass and every gradient before
the optimizer step. At the first NaN or inf it names the epoch, the global step, the batch of
the epoch and the training images of the batch, leaves that step out (gradients dropped, so
the optimizer does not move, and BatchNorm statistics put back as they were before the step),
and by ``trainer.on_nonfinite``:

* ``stop``: saves the state before the step to ``last.ckpt`` and raises a NonFiniteError;
  ``--resume`` continues from that step (after a fix, e.g. a lower learning rate);
* ``skip``: logs a warning and goes on; ``train/skipped_steps`` counts the steps left out.

With a GradScaler (``16-mixed``) inf gradients are the scaler's business (it skips those
steps and lowers its scale), so only the loss is checked.

:class:`SkippedImageCount` logs ``data/skipped_images``: images left out of the training
batches as unreadable (``data.on_bad_image: skip``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from glassmetric.errors import NonFiniteError

log = logging.getLogger("glassmetric.training")

POLICIES = ("stop", "skip")


def _describe(indices: list[int], shown: int = 16) -> str:
    more = f", ... ({len(indices)} in all)" if len(indices) > shown else ""
    return "[" + ", ".join(map(str, indices[:shown])) + more + "]"


class NonFiniteGuard(Callback):
    def __init__(self, policy: str, checkpoint: Path):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.checkpoint = Path(checkpoint)
        self.skipped = 0  # steps left out in this run
        self._epoch_skipped = 0
        self._bad_loss: float | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._where = ""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_skipped = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._bad_loss = None
        indices = batch["index"].tolist() if isinstance(batch, dict) and "index" in batch else []
        self._where = (
            f"epoch {trainer.current_epoch}, step {trainer.global_step} (batch {batch_idx} of the epoch), "
            f"training images {_describe(indices)}"
        )
        # running statistics change in the forward pass: keep them to put back on a skip
        self._buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers()}

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = float(loss.detach().float().flatten()[0])

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        what = f"loss ({self._bad_loss})" if self._bad_loss is not None else None
        if what is None and getattr(trainer.precision_plugin, "scaler", None) is None:
            bad = [
                n
                for n, p in pl_module.named_parameters()
                if p.grad is not None and not bool(torch.isfinite(p.grad).all())
            ]
            if bad:
                what = f"gradient of {bad[0]}" + (f" and {len(bad) - 1} more parameters" if len(bad) > 1 else "")
        if what is None:
            return
        self._leave_step_out(pl_module, optimizer)
        if self.policy == "skip":
            self.skipped += 1
            self._epoch_skipped += 1
            log.warning("non-finite %s at %s: step skipped (trainer.on_nonfinite: skip)", what, self._where)
            return
        trainer.save_checkpoint(self.checkpoint, weights_only=False)
        raise NonFiniteError(
            f"non-finite {what} at {self._where}: stopped (trainer.on_nonfinite: stop); the state before "
            f"this step is in {self.checkpoint}: fix the cause (e.g. lower optim.lr, set trainer.gradient_clip_val) "
            f"and --resume, or resume with trainer.on_nonfinite=skip"
        )

    def _leave_step_out(self, pl_module: pl.LightningModule, optimizer) -> None:
        """Drop every gradient (optimizers skip parameters without one) and restore the buffers."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        with torch.no_grad():
            for name, buffer in pl_module.named_buffers():
                if name in self._buffers:
                    buffer.copy_(self._buffers[name])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("train/skipped_steps", float(self._epoch_skipped), on_epoch=True, reduce_fx="sum")


class SkippedImageCount(Callback):
    """Counts the images left out of training batches as unreadable, per epoch, in the log."""

    def __init__(self) -> None:
        self.total = 0
        self._epoch = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if isinstance(batch, dict) and "skipped" in batch:
            self._epoch += int(batch["skipped"])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.total += self._epoch
        pl_module.log("data/skipped_images", float(self._epoch), on_epoch=True, reduce_fx="sum")
        if self._epoch:
            log.warning(
                "epoch %d: skipped %d unreadable training image(s) (data.on_bad_image: skip)",
                trainer.current_epoch,
                self._epoch,
            )


def reliability_callbacks(cfg, last: Path) -> list[Callback]:
    """The callbacks ``fit`` adds for exact resume and guarded training: per-step seeds,
    step checkpoints to ``last``, the non-finite guard and the skipped-image count."""
    from glassmetric.training.resume import StepCheckpoint, StepSeed

    t = cfg.trainer
    return [
        StepSeed(cfg.seed),
        StepCheckpoint(last, t.checkpoint_every_n_steps),
        NonFiniteGuard(t.on_nonfinite, last),
        SkippedImageCount(),
    ]
