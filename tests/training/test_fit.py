"""End-to-end training on tiny synthetic data: checkpoints, exact resume, selection, CLI."""

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from glassmetric.checkpoints import load_trained, safe_torch_load
from glassmetric.cli import main
from glassmetric.config import load_config
from glassmetric.data.registry import build_splits
from glassmetric.errors import CheckpointError
from glassmetric.factory import build_model_from_config
from glassmetric.training.fit import fit

TINY = [
    "data.image_size=64",
    "data.resize=64",
    "data.num_workers=0",
    "data.synthetic.num_classes=12",
    "data.synthetic.images_per_class=6",
    "data.val_classes=2",
    "model.backbone=resnet18",
    "model.embedding_dim=16",
    "trainer.batch_size=12",
    "trainer.samples_per_class=3",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
    "eval.batch_size=32",
    "optim.lr=1e-3",
]


def tiny_config(tmp_path: Path, *extra: str):
    return load_config("demo_scratch", [*TINY, f"trainer.output_dir={tmp_path}", *list(extra)])


def test_fit_writes_checkpoints_logs_and_metrics(tmp_path):
    result = fit(tiny_config(tmp_path, "trainer.max_epochs=2"), baseline=True)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert result.checkpoint == tmp_path / "checkpoints" / "best.ckpt" and result.checkpoint.is_file()
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "logs" / "version_0" / "metrics.csv").is_file()
    assert list((tmp_path / "logs" / "version_0").glob("events.out.tfevents.*"))
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert set(report) == {"checkpoint", "test", "untrained"}
    for metrics in (report["test"], report["untrained"]):
        assert {"recall@1", "recall@8", "nmi", "r_precision", "map_at_r"} <= set(metrics)
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    # the selected checkpoint is the epoch with the best validation R@1
    ckpt = safe_torch_load(result.checkpoint)
    callback_state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert callback_state["best_model_path"].endswith("best.ckpt")
    assert "config" in ckpt["glassmetric"]


def test_validation_classes_come_from_training_classes_only():
    cfg = load_config("demo_scratch", TINY)
    splits = build_splits(cfg.data, None, None, seed=cfg.seed)
    train, val, test = (set(np.unique(s.labels)) for s in (splits.train, splits.val, splits.test))
    assert len(val) == 2 and not (val & train) and not (val & test) and not (train & test)


def _states(path: Path):
    ckpt = safe_torch_load(path)
    return ckpt["state_dict"], ckpt["optimizer_states"][0]["state"], ckpt["global_step"], ckpt["epoch"]


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    else:
        assert a == b


class CrashAtEpoch(Callback):
    """Simulates a crash at the start of an epoch, after the previous epoch's checkpoint."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("loss", ["multisimilarity", "proxyanchor"])
def test_resume_repeats_the_uninterrupted_run(tmp_path, loss):
    overrides = ["trainer.max_epochs=3", f"loss.name={loss}", "optim.scheduler=cosine"]
    straight = fit(tiny_config(tmp_path / "a", *overrides), run_test=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tiny_config(tmp_path / "b", *overrides), run_test=False, callbacks=[CrashAtEpoch(2)])
    resumed = fit(tiny_config(tmp_path / "b", *overrides), resume=True, run_test=False)
    assert len(list((tmp_path / "b" / "logs").glob("version_*/metrics.csv"))) == 2  # no log lost
    a = _states(straight.output_dir / "checkpoints" / "last.ckpt")
    b = _states(resumed.output_dir / "checkpoints" / "last.ckpt")
    assert a[2:] == b[2:]
    _assert_same(a[0], b[0])
    _assert_same(a[1], b[1])


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    fit(tiny_config(tmp_path, "trainer.max_epochs=1"), run_test=False)
    with pytest.raises(CheckpointError, match="--resume"):
        fit(tiny_config(tmp_path, "trainer.max_epochs=1"), run_test=False)


def test_loss_parameters_are_checkpointed_with_their_own_learning_rate(tmp_path):
    result = fit(
        tiny_config(
            tmp_path, "trainer.max_epochs=1", "loss.name=proxyanchor", "trainer.select=last", "optim.scheduler=none"
        ),
        run_test=False,
    )
    ckpt = safe_torch_load(result.checkpoint)
    assert ckpt["state_dict"]["loss.loss.proxies"].shape == (4, 16)  # 6 training classes - 2 validation
    groups = {g["name"]: g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]}
    assert groups["loss"] == pytest.approx(100 * 1e-3)
    assert groups["backbone"] == pytest.approx(1e-3)


def test_eval_cli_reproduces_the_fit_metrics(tmp_path, capsys):
    result = fit(tiny_config(tmp_path, "trainer.max_epochs=1"))
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(result.checkpoint), "--out", str(out), "--device", "cpu"]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics == pytest.approx(result.test_metrics, abs=1e-6)
    model, cfg = load_trained(str(result.checkpoint))
    assert cfg.model.embedding_dim == 16 and not model.training


def test_cli_errors_are_one_line_and_name_the_culprit(tmp_path, capsys):
    assert main(["fit", "--config", "demo_scratch", "trainer.max_epoch=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trainer.max_epoch" in err and len(err.splitlines()) == 1
    assert main(["eval", "--checkpoint", str(tmp_path / "nope.ckpt")]) == 2
    assert "nope.ckpt" in capsys.readouterr().err
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(junk)]) == 2
    assert "junk.ckpt" in capsys.readouterr().err


def test_throughput_is_measured(tmp_path):
    result = fit(tiny_config(tmp_path, "trainer.max_epochs=2", "trainer.select=last"), run_test=False)
    assert len(result.epoch_seconds) == 2 and all(s > 0 for s in result.epoch_seconds)
    assert 0.0 <= result.data_wait_share < 1.0
    header = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "perf/data_wait_share" in header and "perf/train_images_per_s" in header


def test_warmup_epochs_leave_the_backbone_untouched(tmp_path):
    cfg = tiny_config(
        tmp_path, "trainer.max_epochs=1", "trainer.select=last", "optim.warmup_epochs=1", "optim.scheduler=cosine"
    )
    result = fit(cfg, run_test=False)
    trained = safe_torch_load(result.checkpoint)["state_dict"]
    pl.seed_everything(cfg.seed, verbose=False)  # as fit() does before building the model
    initial = build_model_from_config(cfg).state_dict()
    assert torch.equal(trained["model.backbone.trunk.conv1.weight"], initial["backbone.trunk.conv1.weight"])
    assert not torch.equal(trained["model.head.linear.weight"], initial["head.linear.weight"])


@pytest.mark.parametrize("loss", ["multisimilarity", "triplet"])
def test_structural_training_under_bf16_autocast(tmp_path, loss):
    cfg = tiny_config(
        tmp_path,
        "trainer.max_epochs=1",
        "trainer.select=last",
        "trainer.precision=bf16-mixed",
        "model.spatial_grid=4",
        "loss.similarity=structural",
        f"loss.name={loss}",
    )
    result = fit(cfg, run_test=False)
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        losses = [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]
    assert losses and all(np.isfinite(losses))
    state = safe_torch_load(result.checkpoint)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_overrides_may_follow_flags(monkeypatch):
    from glassmetric import cli

    args = cli._parse(["fit", "--config", "demo_scratch", "trainer.max_epochs=2", "--overwrite", "loss.name=margin"])
    assert args.overwrite and args.overrides == ["trainer.max_epochs=2", "loss.name=margin"]
    with pytest.raises(SystemExit):
        cli._parse(["fit", "--config", "demo_scratch", "--overwrite", "--no-such-flag"])
    with pytest.raises(SystemExit):
        cli._parse(["presets", "a=b"])


@pytest.mark.parametrize("loss", ["multisimilarity", "margin"])
def test_fit_with_attentive_groups(tmp_path, loss):
    cfg = tiny_config(tmp_path, "trainer.max_epochs=1", "model.groups=3", "model.embedding_dim=18", f"loss.name={loss}")
    result = fit(cfg)
    assert set(result.test_metrics) >= {"recall@1", "nmi", "map_at_r"}
    state = safe_torch_load(result.checkpoint)["state_dict"]
    assert state["model.extra_heads.grouping.queries"].shape == (3, 64)  # k queries of C/8 = 512/8
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    diversity = [float(r["train/diversity"]) for r in rows if r.get("train/diversity")]
    assert diversity and all(np.isfinite(diversity))
    model, _ = load_trained(str(result.checkpoint))
    out = model(torch.randn(2, 3, 64, 64))
    assert out.group_embeddings.shape == (2, 3, 6) and out.attention.shape == (2, 3, 2, 2)
