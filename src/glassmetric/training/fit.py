"""``glassmetric fit``: train with PyTorch Lightning, select a model, evaluate it on the test split.

Layout of ``trainer.output_dir``::

    config.yaml               the resolved configuration
    checkpoints/last.ckpt     written atomically at the end of every epoch and every
                              trainer.checkpoint_every_n_steps steps (``--resume`` reads it)
    checkpoints/last.prev.ckpt  the one before (``--resume`` falls back to it when last.ckpt is damaged)
    checkpoints/best.ckpt     best validation ``trainer.monitor`` (when ``trainer.select: val``)
    feature_cache.pt          the frozen stages' output for the training views (``trainer.cache_features``,
                              see :mod:`.feature_cache`; reused while it fits, kept by ``--overwrite``)
    logs/version_N/           CSV (and, with tensorboard installed, TensorBoard) logs of the N-th (re)start
    metrics.json              test metrics of the selected model (and of the untrained one)
    .fit.lock                 held by the run writing the folder (see :mod:`.run_folder`)

With ``progress`` (``glassmetric fit``) the run starts with a banner on stderr (config, output
folder, device, data sizes) and says each phase there (untrained baseline, training, testing);
Lightning's progress bar is on stderr always, so stdout carries only results. Every path is checked writable before the run starts; ``--overwrite`` removes these files of
an earlier run (and only these), ``--resume`` first checks that the config's model is the
checkpoint's.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch.utils.data import DataLoader

from glassmetric.checkpoints import safe_torch_load
from glassmetric.config import Config, save_config
from glassmetric.data.image_io import collate_readable
from glassmetric.data.registry import Splits
from glassmetric.data.sampler import MPerClassBatchSampler
from glassmetric.errors import CheckpointError, ConfigError
from glassmetric.extras import available
from glassmetric.factory import build_model_from_config, evaluation_recall_ks, make_splits
from glassmetric.models.backbone_split import split_frozen
from glassmetric.outputs import atomic_write_text, writable_folder
from glassmetric.retrieval.evaluate import evaluate_model
from glassmetric.training.checkpoint_io import AtomicCheckpointIO
from glassmetric.training.console import StderrProgressBar, announce, count, fit_banner, images_and_classes
from glassmetric.training.distributed import IndexedDataset, check_devices, ddp_strategy, eval_sampler
from glassmetric.training.feature_cache import CachedTraining, cached_training_set
from glassmetric.training.guards import reliability_callbacks
from glassmetric.training.module import MetricLearner
from glassmetric.training.resume import (
    EpochBatchSampler,
    check_resumed_model,
    check_resumed_shapes,
    discard_resume_checkpoints,
    resumable_train_loader,
    resume_checkpoint,
)
from glassmetric.training.run_folder import clear_previous_run, is_launching_process, run_folder_lock
from glassmetric.training.throughput import ThroughputMonitor


def seed_epoch(seed: int, epoch: int, loader: DataLoader | None) -> None:
    """Reseed every RNG of training from (seed, epoch): the batch sampler, the DataLoader's
    worker seeds, and the global RNGs used by augmentations in the main process and dropout.

    An epoch then depends only on the seed, the epoch number and the weights, so a run resumed
    from an end-of-epoch checkpoint repeats the uninterrupted run.
    """
    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    random.seed(epoch_seed)
    np.random.seed(epoch_seed)
    torch.manual_seed(epoch_seed)
    if loader is not None:
        cast(EpochBatchSampler, loader.batch_sampler).set_epoch(epoch)  # ResumableBatches (resumable_train_loader)
        loader.generator.manual_seed(epoch_seed)


def _epochs_processed(trainer: pl.Trainer) -> int:
    """The training epochs the trainer has completed (the epoch it is about to run, from 0)."""
    # the tracker is a _ProcessedTracker; Lightning annotates it as its base, _ReadyCompletedTracker
    return trainer.fit_loop.epoch_progress.current.processed  # type: ignore[attr-defined]


class EpochSeed(Callback):
    """Calls :func:`seed_epoch` before every training epoch (Lightning does not call
    ``set_epoch`` on a batch sampler itself)."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed_epoch(self.seed, _epochs_processed(trainer), trainer.train_dataloader)


class MetricDataModule(pl.LightningDataModule):
    """m-per-class training batches (sharded across DDP replicas) and the validation split;
    with ``cached``, the training batches hold cached features instead of images."""

    def __init__(self, cfg: Config, splits: Splits, cached: CachedTraining | None = None):
        super().__init__()
        self.cfg = cfg
        self.splits = splits
        self.cached = cached

    def train_dataloader(self) -> DataLoader:
        t = self.cfg.trainer
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = MPerClassBatchSampler(
            self.splits.train.labels,
            t.samples_per_class,
            t.batch_size,
            seed=self.cfg.seed,
            num_replicas=world,
            rank=rank,
        )
        # cached features need no decoding or augmenting: the main process reads them
        train, workers = (
            (self.cached.dataset, 0) if self.cached is not None else (self.splits.train, self.cfg.data.num_workers)
        )
        loader = resumable_train_loader(train, sampler, seed=self.cfg.seed, num_workers=workers, trainer=self.trainer)
        # on resume the first iterator is built before the epoch hooks run: seed it here too,
        # with the epoch Lightning is about to run (current_epoch may still be the last one)
        seed_epoch(self.cfg.seed, _epochs_processed(self.trainer) if self.trainer else 0, loader)
        return loader

    def val_dataloader(self) -> DataLoader | list:
        if self.splits.val is None:
            return []
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        val = IndexedDataset(self.splits.val)  # each rank a shard; on_validation_epoch_end gathers them
        return DataLoader(
            val,
            batch_size=self.cfg.eval.batch_size,
            sampler=eval_sampler(val, world, rank),
            num_workers=self.cfg.data.num_workers,
            collate_fn=collate_readable,
        )


@dataclass
class FitResult:
    output_dir: Path
    checkpoint: Path
    test_metrics: dict[str, float]
    baseline_metrics: dict[str, float] | None = None
    #: wall time of each epoch run in this call, and the share of step time spent waiting for data
    epoch_seconds: list[float] = field(default_factory=list)
    data_wait_share: float = 0.0
    #: seconds spent computing the feature cache (``trainer.cache_features``; 0: off or reused)
    cache_build_seconds: float = 0.0


def fit(
    cfg: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    baseline: bool = False,
    run_test: bool = True,
    callbacks: Sequence[Callback] = (),
    source: str | None = None,
    progress: bool = False,
) -> FitResult:
    """Train, select (best validation ``trainer.monitor`` or the last epoch), evaluate on the test split.

    The run holds the lock of ``trainer.output_dir`` throughout (:mod:`.run_folder`): a second
    run into the same folder fails at once. With ``resume``, a config whose model differs from
    the checkpoint's fails before anything is written; with ``overwrite``, every file an earlier
    run wrote there is removed first. ``callbacks`` are extra Lightning callbacks (e.g. for
    logging or early stopping). With ``progress`` (as ``glassmetric fit`` runs it),
    a banner (``source`` names the preset or file of ``cfg``) and one line per phase go to stderr.
    """
    check_devices(cfg.trainer)
    out = Path(cfg.trainer.output_dir)
    launching = is_launching_process()  # DDP ranks > 0 are started for this run: they write nothing here
    with ExitStack() as stack:
        if launching:
            writable_folder(out, "trainer.output_dir", create=True)
            for sub in ("checkpoints", "logs"):
                if (out / sub).exists():
                    writable_folder(out / sub, "trainer.output_dir")
            stack.enter_context(run_folder_lock(out))
        return _fit(
            cfg,
            out,
            launching,
            resume=resume,
            overwrite=overwrite,
            baseline=baseline,
            run_test=run_test,
            callbacks=callbacks,
            source=source,
            progress=progress and launching,
        )


def _loggers(out: Path, version: int) -> list[Logger]:
    """CSV logs always, TensorBoard's where tensorboard is installed (the ``tensorboard`` extra);
    each (re)start logs into a new logs/version_N, so a resume never overwrites old logs."""
    loggers: list[Logger] = [CSVLogger(out, name="logs", version=version)]
    if available("tensorboard"):
        loggers.append(TensorBoardLogger(out, name="logs", version=version))
    return loggers


def _fit(
    cfg: Config,
    out: Path,
    launching: bool,
    *,
    resume: bool,
    overwrite: bool,
    baseline: bool,
    run_test: bool,
    callbacks: Sequence[Callback],
    source: str | None = None,
    progress: bool = False,
) -> FitResult:
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if last.exists() and not (resume or overwrite):
        raise CheckpointError(f"{last} exists: pass --resume to continue that run, or --overwrite to start again")
    found = resume_checkpoint(ckpt_dir) if resume else None
    resumed = None
    if found is not None:  # only what the checks need, read before anything is written
        stored = safe_torch_load(found)
        shapes = {
            k: torch.empty(v.shape, device="meta")
            for k, v in stored.get("state_dict", {}).items()
            if isinstance(v, torch.Tensor)
        }
        resumed = {"glassmetric": stored.get("glassmetric"), "state_dict": shapes}
        del stored
        check_resumed_model(cfg, found, resumed)
    if launching and not resume:
        if overwrite:
            kept = clear_previous_run(out)
            if kept:
                print(f"--overwrite: kept what glassmetric fit did not write in {out}: {', '.join(kept)}")
        else:
            discard_resume_checkpoints(ckpt_dir)

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model_from_config(cfg)
    # training on cached features: where the backbone splits, checked before anything is written
    split = split_frozen(model.backbone) if cfg.trainer.cache_features else None
    splits = make_splits(cfg, model)
    module = MetricLearner(cfg, splits.train.labels, model=model)
    if resumed is not None:
        assert found is not None  # resumed was read from it
        check_resumed_shapes(cfg, found, resumed, module)
        resumed = None
    if launching:
        save_config(cfg, out / "config.yaml")
    if progress:
        announce(fit_banner(cfg, splits, source))
    ks = evaluation_recall_ks(cfg)
    eval_kw: dict[str, Any] = {
        "recall_ks": ks,
        "batch_size": cfg.eval.batch_size,
        "num_workers": cfg.data.num_workers,
        "knn_backend": cfg.eval.knn_backend,
        "max_k": cfg.eval.knn_k,
    }

    baseline_metrics = None
    test_size = images_and_classes(splits.test)
    if baseline:
        if progress:
            announce(f"evaluating the untrained model on {test_size} ...")
        baseline_metrics = evaluate_model(module.model, splits.test, splits.gallery, **eval_kw)

    select_val = cfg.trainer.select == "val"
    # "last" is rewritten after every epoch (and its validation); "best" on a better validation score.
    # The best callback comes first so that last.ckpt carries its up-to-date state.
    common: dict[str, Any] = {
        "dirpath": ckpt_dir,
        "save_top_k": 1,
        "save_last": False,
        "auto_insert_metric_name": False,
        "enable_version_counter": False,
    }
    monitor = f"val/{cfg.trainer.monitor}"
    best_cb = ModelCheckpoint(filename="best", monitor=monitor, mode="max", **common) if select_val else None
    last_cb = ModelCheckpoint(filename="last", monitor=None, **common)
    version = len(list((out / "logs").glob("version_*")))
    throughput = ThroughputMonitor()
    trainer = pl.Trainer(
        max_epochs=cfg.trainer.max_epochs,
        accelerator=cfg.trainer.accelerator,
        devices=cast("int | str", cfg.trainer.devices),  # validation writes GPU indices as "0,1"
        num_nodes=cfg.trainer.num_nodes,
        strategy=ddp_strategy(cfg),
        sync_batchnorm=cfg.trainer.sync_batchnorm,
        precision=cfg.trainer.precision,
        logger=_loggers(out, version),
        callbacks=[
            *([StderrProgressBar()] if cfg.trainer.progress_bar else []),
            *filter(None, [best_cb, last_cb]),
            EpochSeed(cfg.seed),
            throughput,
            *reliability_callbacks(cfg, last),
            *callbacks,
        ],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
        check_val_every_n_epoch=cfg.trainer.val_every,
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        default_root_dir=out,
    )
    cached = None
    if split is not None:
        if trainer.world_size > 1:
            raise ConfigError(
                f"trainer.cache_features: training on cached features runs in one process, not "
                f"{trainer.world_size}: set trainer.devices and trainer.num_nodes to 1, or trainer.cache_features: 0"
            )
        cached = cached_training_set(cfg, split, splits.train, out)
        module.feature_split = cached.split
    ckpt_path = None
    if resume:
        if found is not None:
            ckpt_path = str(found)
            print(f"resuming from {found}")
        else:
            print(f"no checkpoint at {last}: starting from scratch")
    if progress:
        announce(f"training for {count(cfg.trainer.max_epochs, 'epoch')} on {images_and_classes(splits.train)} ...")
    trainer.fit(module, datamodule=MetricDataModule(cfg, splits, cached), ckpt_path=ckpt_path)

    selected = Path(best_cb.best_model_path) if best_cb is not None and best_cb.best_model_path else last
    result = FitResult(
        output_dir=out,
        checkpoint=selected,
        test_metrics={},
        baseline_metrics=baseline_metrics,
        epoch_seconds=throughput.epoch_seconds,
        data_wait_share=throughput.data_wait_share,
        cache_build_seconds=cached.cache.build_seconds if cached is not None else 0.0,
    )
    if run_test and trainer.is_global_zero:
        if progress:
            announce(f"testing {selected.name} on {test_size} ...")
        state = safe_torch_load(selected)["state_dict"]
        module.load_state_dict(state)
        result.test_metrics = evaluate_model(module.model, splits.test, splits.gallery, **eval_kw)
        report = {"checkpoint": str(selected), "test": result.test_metrics}
        if baseline_metrics is not None:
            report["untrained"] = baseline_metrics
        atomic_write_text(out / "metrics.json", json.dumps(report, indent=2))
    return result
