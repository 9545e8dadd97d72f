"""What ``glassmetric fit`` tells the user on stderr while it runs: a start banner (where it
writes, on what device, on how much data), one line per phase, and Lightning's progress bar.

Everything here goes to stderr, so stdout carries only the results (``fit > results.txt``).
"""

from __future__ import annotations

import sys
from contextlib import redirect_stdout

import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from glassmetric.config import Config
from glassmetric.data.base import RetrievalDataset
from glassmetric.data.registry import Splits

__all__ = ["StderrProgressBar", "announce", "count", "fit_banner", "images_and_classes"]


def announce(line: str) -> None:
    """One status line on stderr, flushed at once."""
    print(line, file=sys.stderr, flush=True)


def count(n: int, noun: str) -> str:
    """``1 epoch``, ``1,234 epochs``."""
    return f"{n:,} {noun}{'' if n == 1 else ('es' if noun.endswith('s') else 's')}"


def images_and_classes(data: RetrievalDataset) -> str:
    """``1,234 images of 50 classes``."""
    return f"{count(len(data), 'image')} of {count(len(data.classes), 'class')}"


def _device(cfg: Config) -> str:
    """The device(s) the run trains on, as Lightning resolves ``trainer.accelerator`` and ``devices``."""
    t = cfg.trainer
    accelerator = t.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu":
        accelerator = "cuda"
    nodes = f" x {t.num_nodes} nodes" if t.num_nodes > 1 else ""
    return f"{accelerator} (devices {t.devices}{nodes}, precision {t.precision})"


def fit_banner(cfg: Config, splits: Splits, source: str | None = None) -> str:
    """The lines ``fit`` starts with: config, output folder, device, data sizes."""
    where = f"config {source}, " if source else ""
    lines = [
        f"glassmetric fit: {where}output {cfg.trainer.output_dir}, device {_device(cfg)}",
        f"  data {cfg.data.name}: train {images_and_classes(splits.train)}"
        + (f"; val {images_and_classes(splits.val)}" if splits.val is not None else "; no val split")
        + f"; test {images_and_classes(splits.test)}"
        + (f" searched in a gallery of {images_and_classes(splits.gallery)}" if splits.gallery is not None else ""),
        f"  model {cfg.model.backbone}, embedding {cfg.model.embedding_dim}; loss {cfg.loss.name}; "
        f"{count(cfg.trainer.max_epochs, 'epoch')} of batches of {cfg.trainer.batch_size}",
    ]
    return "\n".join(lines)


class StderrProgressBar(TQDMProgressBar):
    """Lightning's TQDM progress bar, drawn on stderr (Lightning's own writes to stdout)."""

    def init_sanity_tqdm(self):
        with redirect_stdout(sys.stderr):
            return super().init_sanity_tqdm()

    def init_train_tqdm(self):
        with redirect_stdout(sys.stderr):
            return super().init_train_tqdm()

    def init_validation_tqdm(self):
        with redirect_stdout(sys.stderr):
            return super().init_validation_tqdm()

    def init_test_tqdm(self):
        with redirect_stdout(sys.stderr):
            return super().init_test_tqdm()

    def init_predict_tqdm(self):
        with redirect_stdout(sys.stderr):
            return super().init_predict_tqdm()
