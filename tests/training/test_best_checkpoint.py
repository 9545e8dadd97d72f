"""``checkpoints/best.ckpt`` holds the weights of the epoch whose logged validation score is the
highest: checked against the scores in the run's metrics.csv and the weights recorded at the end
of every validation, not against the selection code's own bookkeeping."""

import csv
import dataclasses

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from glassmetric.checkpoints import safe_torch_load
from glassmetric.config import load_config
from glassmetric.data.base import Sample
from glassmetric.training.fit import fit

EPOCHS = 3
#: the epoch whose validation images are flat colours, one per class (see RiggedValidation)
EASY_EPOCH = 1
MONITOR = "map_at_r"

#: 16 classes x 6 images at 64 px: 4 training classes, 4 validation classes (carved from the 8
#: training classes), 8 test classes; validation after every epoch
TINY = [
    "data.image_size=64",
    "data.resize=64",
    "data.num_workers=0",
    "data.synthetic.num_classes=16",
    "data.synthetic.images_per_class=6",
    "data.val_classes=4",
    "model.backbone=resnet18",
    "model.embedding_dim=16",
    "trainer.batch_size=12",
    "trainer.samples_per_class=3",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
    "trainer.select=val",
    f"trainer.monitor={MONITOR}",
    "trainer.val_every=1",
    f"trainer.max_epochs={EPOCHS}",
    "eval.batch_size=32",
    "optim.lr=1e-3",
]


class RiggedValidation(Callback):
    """Records the model's weights at the end of each epoch's validation, and at EASY_EPOCH
    shows it validation images of one flat colour per class: any model embeds those alike within
    a class, so that epoch scores far above the others (a tiny run learns little), and the best
    epoch is neither the first nor the last."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        val = trainer.datamodule.splits.val
        if trainer.current_epoch == EASY_EPOCH:
            real_load = val.load

            def flat_colour(index: int) -> Sample:
                sample = real_load(index)
                colour = tuple(int(c) for c in np.random.default_rng(sample.label).integers(0, 256, 3))
                return dataclasses.replace(sample, image=Image.new("RGB", sample.image.size, colour))

            val.load = flat_colour
        else:
            vars(val).pop("load", None)  # the real images again

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights[trainer.current_epoch] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def logged_scores(run) -> dict[int, float]:
    """epoch -> validation score, as the run's CSV log has them."""
    with open(run / "logs" / "version_0" / "metrics.csv") as f:
        return {int(r["epoch"]): float(r[f"val/{MONITOR}"]) for r in csv.DictReader(f) if r.get(f"val/{MONITOR}")}


def test_best_checkpoint_is_the_epoch_with_the_best_logged_validation_score(tmp_path):
    recorder = RiggedValidation()
    result = fit(
        load_config("demo_scratch", [*TINY, f"trainer.output_dir={tmp_path}"]), run_test=False, callbacks=[recorder]
    )

    scores = logged_scores(tmp_path)
    assert sorted(scores) == list(range(EPOCHS)) == sorted(recorder.weights)
    best_epoch = max(scores, key=scores.get)
    assert sum(s == scores[best_epoch] for s in scores.values()) == 1, f"tied best scores, ambiguous: {scores}"
    assert best_epoch == EASY_EPOCH, f"the flat-colour epoch {EASY_EPOCH} should score best: {scores}"

    assert result.checkpoint == tmp_path / "checkpoints" / "best.ckpt"
    best = safe_torch_load(result.checkpoint)
    assert best["epoch"] == best_epoch, f"best.ckpt is epoch {best['epoch']}, the logged scores are {scores}"
    stored, recorded = best["state_dict"], recorder.weights[best_epoch]
    assert stored.keys() == recorded.keys()
    for key, value in recorded.items():
        torch.testing.assert_close(stored[key], value, rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")
    # and not the weights of any other epoch (the head differs between epochs)
    head = next(k for k in recorded if k.startswith("model.head.") and k.endswith("weight"))
    for epoch, weights in recorder.weights.items():
        if epoch != best_epoch:
            assert not torch.equal(stored[head], weights[head]), f"best.ckpt's {head} equals epoch {epoch}'s too"
