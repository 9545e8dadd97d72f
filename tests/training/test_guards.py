"""Numerical guards: a NaN loss or gradient is caught at its step (stop with a checkpoint, or
skip the step), and fp16 / bf16 autocast runs of every method stay finite."""

import csv
import math
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from glassmetric.checkpoints import safe_torch_load
from glassmetric.cli import main
from glassmetric.config import load_config
from glassmetric.errors import NonFiniteError
from glassmetric.training.fit import fit

#: 8 classes x 12 images at 64 px: 4 training classes, 4 steps of 12 images per epoch
TINY = [
    "data.image_size=64",
    "data.resize=64",
    "data.num_workers=0",
    "data.synthetic.num_classes=8",
    "data.synthetic.images_per_class=12",
    "data.val_classes=0",
    "trainer.select=last",
    "model.backbone=timm:test_resnet",
    "model.embedding_dim=16",
    "trainer.batch_size=12",
    "trainer.samples_per_class=3",
    "trainer.max_epochs=1",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
    "eval.batch_size=64",
    "optim.lr=1e-3",
]


def tiny(out: Path, *extra: str):
    return load_config("demo_scratch", [*TINY, f"trainer.output_dir={out}", *extra])


class NaNLossAt(Callback):
    """Makes the loss of one step NaN (a forward hook on the loss module)."""

    def __init__(self, step: int):
        self.step, self.hook = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.hook = pl_module.loss.register_forward_hook(lambda m, args, out: out * float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


class InfGradAt(Callback):
    """Puts an inf into one gradient of one step, the loss staying finite."""

    def __init__(self, step: int):
        self.step = step

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")


class Snapshots(Callback):
    """The module's whole state (weights and buffers) at the start of every step."""

    def __init__(self):
        self.states = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _adam_steps(ckpt: Path) -> set[int]:
    return {int(s["step"]) for s in safe_torch_load(ckpt)["optimizer_states"][0]["state"].values()}


def _logged(out: Path, key: str, version: int = 0) -> list[float]:
    with open(out / "logs" / f"version_{version}" / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


def test_nan_loss_stops_with_a_checkpoint_of_the_step_before_and_resumes_with_skip(tmp_path):
    with pytest.raises(NonFiniteError) as e:
        fit(tiny(tmp_path), run_test=False, callbacks=[NaNLossAt(2)])
    message = str(e.value)
    assert "\n" not in message
    assert re.search(
        r"non-finite loss \(nan\) at epoch 0, step 2 \(batch 2 of the epoch\), training images \[\d+(, \d+){11}\]",
        message,
    ), message
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert str(last) in message and "--resume" in message
    ckpt = safe_torch_load(last)
    assert ckpt["global_step"] == 2 and _adam_steps(last) == {2}  # the state before the bad step
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    # the same NaN again, now skipped: the run finishes with one step fewer in the optimizer
    fit(tiny(tmp_path, "trainer.on_nonfinite=skip"), resume=True, run_test=False, callbacks=[NaNLossAt(2)])
    assert safe_torch_load(last)["global_step"] == 4 and _adam_steps(last) == {3}
    assert _logged(tmp_path, "train/skipped_steps", version=1) == [1.0]


def test_a_skipped_step_changes_nothing(tmp_path, caplog):
    snaps = Snapshots()
    fit(tiny(tmp_path, "trainer.on_nonfinite=skip"), run_test=False, callbacks=[InfGradAt(2), snaps])
    before, after = snaps.states[2], snaps.states[3]
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert not all(torch.equal(snaps.states[1][k], before[k]) for k in before)  # other steps do train
    assert _adam_steps(tmp_path / "checkpoints" / "last.ckpt") == {3}
    assert _logged(tmp_path, "train/skipped_steps") == [1.0]
    warning = next(r.getMessage() for r in caplog.records if "non-finite" in r.getMessage())
    assert "gradient of model.backbone" in warning and "epoch 0, step 2 (batch 2 of the epoch)" in warning


def test_cli_reports_a_diverging_run_on_one_line(tmp_path, capsys):
    # SGD at a learning rate of 1e30: the first step sends the weights to inf, the next loss is NaN
    argv = [
        "fit",
        "--config",
        "demo_scratch",
        *TINY,
        f"trainer.output_dir={tmp_path}",
        "optim.name=sgd",
        "optim.lr=1e30",
        "--no-test",
    ]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # the start banner and phase lines, then the error on one line, last
    errors = [line for line in lines if "error:" in line]
    assert errors == lines[-1:] and lines[-1].startswith("glassmetric fit: error: "), lines
    assert re.search(r"non-finite (loss|gradient).* at epoch 0, step \d", lines[-1]), lines
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


METHODS = {
    "global": [],
    "structural": ["model.spatial_grid=2", "loss.similarity=structural"],
    "grouping": ["model.groups=2"],
    "introspective": ["model.uncertainty_dim=8", "loss.similarity=introspective", "loss.name=proxyanchor"],
}


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_autocast_runs_of_every_method_stay_finite(tmp_path, method, precision):
    # a NaN would stop the run (trainer.on_nonfinite: stop), so finishing is the first check
    result = fit(tiny(tmp_path, f"trainer.precision={precision}", *METHODS[method]), run_test=False)
    losses = _logged(tmp_path, "train/loss_step")
    assert len(losses) == 4 and all(map(math.isfinite, losses))
    state = safe_torch_load(result.checkpoint)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert _logged(tmp_path, "train/skipped_steps") == [0.0]
