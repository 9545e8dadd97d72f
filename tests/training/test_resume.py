"""Exact resume: SIGKILL at a random step, --resume, and the same weights, optimizer state and
metrics as the uninterrupted run; a damaged last checkpoint falls back to the previous one."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from nested_close import assert_nested_close

from glassmetric.checkpoints import previous_path, safe_torch_load
from glassmetric.cli import main
from glassmetric.config import load_config
from glassmetric.errors import CheckpointError
from glassmetric.training.fit import fit
from glassmetric.training.resume import resume_checkpoint

SRC = Path(__file__).resolve().parents[2] / "src"
#: 12 classes x 12 images at 64 px (6 train classes, 2 of them for validation: 4 batches of 12
#: per epoch), the 0.5M-parameter timm test ResNet, mixup on (RNG in the step), a checkpoint every step
RUN = [
    "data.image_size=64",
    "data.resize=64",
    "data.synthetic.num_classes=12",
    "data.synthetic.images_per_class=12",
    "data.val_classes=2",
    "model.backbone=timm:test_resnet",
    "model.embedding_dim=16",
    "trainer.batch_size=12",
    "trainer.samples_per_class=3",
    "trainer.max_epochs=3",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
    "trainer.checkpoint_every_n_steps=1",
    "eval.batch_size=64",
    "optim.lr=1e-3",
    "loss.mixup=true",
]
STEPS = 12


def _config(out: Path, *extra: str):
    return load_config("demo_scratch", [*RUN, f"trainer.output_dir={out}", "data.num_workers=0", *extra])


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run, in this process on one thread (as the subprocesses run)."""
    out = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(_config(out))
    finally:
        torch.set_num_threads(threads)
    return out


def _step_losses(out: Path) -> dict[int, float]:
    """train/loss_step by global step over every (re)start's log; a later start wins."""
    losses = {}
    for log in sorted((out / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        with open(log) as f:
            losses.update(
                {int(r["step"]): float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")}
            )
    return losses


def assert_same_run(a: Path, b: Path) -> None:
    ca, cb = (safe_torch_load(p / "checkpoints" / "last.ckpt") for p in (a, b))
    assert (ca["global_step"], ca["epoch"]) == (cb["global_step"], cb["epoch"])
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert_nested_close(ca[key], cb[key], key)
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    assert ma["test"] == pytest.approx(mb["test"], abs=1e-6)
    la, lb = _step_losses(a), _step_losses(b)
    assert len(la) == STEPS and lb and set(lb) <= set(la)
    assert [lb[s] for s in sorted(lb)] == pytest.approx([la[s] for s in sorted(lb)], abs=1e-6)


def _cli(out: Path, *flags: str) -> list[str]:
    # 2 workers here, none in the uninterrupted run: the augmentations do not depend on them
    return [
        sys.executable,
        "-m",
        "glassmetric.cli",
        "fit",
        "--config",
        "demo_scratch",
        *flags,
        *RUN,
        f"trainer.output_dir={out}",
        "data.num_workers=2",
    ]


def _env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }


def _step_of(path: Path) -> int:
    try:
        return int(safe_torch_load(path)["global_step"])
    except CheckpointError:  # not written yet
        return -1


def test_sigkill_at_a_random_step_then_resume_repeats_the_uninterrupted_run(straight, tmp_path):
    seed = int(os.environ.get("GLASSMETRIC_KILL_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    kill_after, delay = rng.randint(1, STEPS - 3), rng.uniform(0.0, 0.15)
    note = f"(kill seed {seed}: SIGKILL once step {kill_after} is checkpointed, after {delay:.3f} s more; GLASSMETRIC_KILL_SEED={seed} repeats it)"
    print(note)
    out = tmp_path / "killed"
    last = out / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(_cli(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while _step_of(last) < kill_after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill {note}: {err[-2000:]}"
    killed_at = _step_of(last)
    assert 0 < killed_at < STEPS, note

    resumed = subprocess.run(_cli(out, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, f"{note}\n{resumed.stderr[-3000:]}"
    assert f"resuming from {last}" in resumed.stdout
    if killed_at % 4:  # 4 steps per epoch: the kill left an epoch unfinished
        assert f"resuming epoch {killed_at // 4} at batch {killed_at % 4} of 4" in resumed.stdout, note
    assert_same_run(straight, out)


class CrashAtStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_a_truncated_last_checkpoint_falls_back_to_the_previous_one(straight, tmp_path, capsys):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            fit(_config(out), callbacks=[CrashAtStep(7)])
        last = out / "checkpoints" / "last.ckpt"
        prev = previous_path(last)
        assert safe_torch_load(last)["global_step"] == 7 and safe_torch_load(prev)["global_step"] == 6
        data = last.read_bytes()
        last.write_bytes(data[: len(data) // 2])  # e.g. a disk that filled up, a copy cut short
        capsys.readouterr()
        fit(_config(out), resume=True)
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "last.ckpt is unreadable (moved to last.damaged.ckpt): resuming from the previous checkpoint" in printed
    assert "(step 6)" in printed and "resuming epoch 1 at batch 2 of 4" in printed
    assert (out / "checkpoints" / "last.damaged.ckpt").is_file()
    assert_same_run(straight, out)


def test_resume_checkpoint_choices(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints"
    assert resume_checkpoint(ckpt) is None  # nothing to resume: start from scratch
    ckpt.mkdir()
    (ckpt / ".last.ckpt.abc.tmp").write_bytes(b"half a write")
    torch.save({"global_step": 3}, ckpt / "last.prev.ckpt")
    assert resume_checkpoint(ckpt) == ckpt / "last.prev.ckpt"  # last.ckpt missing
    assert not (ckpt / ".last.ckpt.abc.tmp").exists()
    assert "last.ckpt is missing" in capsys.readouterr().out
    torch.save({"global_step": 4}, ckpt / "last.ckpt")
    assert resume_checkpoint(ckpt) == ckpt / "last.ckpt"
    (ckpt / "last.ckpt").write_bytes(b"garbage")
    (ckpt / "last.prev.ckpt").write_bytes(b"garbage too")
    with pytest.raises(CheckpointError, match="no readable checkpoint to resume"):
        resume_checkpoint(ckpt)


def test_a_last_checkpoint_that_is_not_a_mapping_falls_back_to_the_previous_one(tmp_path, capsys):
    """A torch file whose top level is a list (or a tensor) is unreadable as a checkpoint too."""
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    torch.save([1, 2], ckpt / "last.ckpt")
    torch.save({"global_step": 3}, ckpt / "last.prev.ckpt")
    assert resume_checkpoint(ckpt) == ckpt / "last.prev.ckpt"
    out = capsys.readouterr().out
    assert "not a glassmetric checkpoint: the top level is a list, not a mapping: trying the previous checkpoint" in out
    assert (ckpt / "last.damaged.ckpt").exists()  # the list, moved aside
    torch.save(torch.ones(2), ckpt / "last.prev.ckpt")
    with pytest.raises(
        CheckpointError, match=r"no readable checkpoint to resume in .*last\.prev\.ckpt: .*the top level is a Tensor"
    ):
        resume_checkpoint(ckpt)


def test_overwrite_discards_the_earlier_runs_checkpoints(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    for name in ("last.ckpt", "last.prev.ckpt", "last.damaged.ckpt"):
        torch.save({"global_step": 99}, ckpt / name)
    fit(
        load_config(
            "demo_scratch",
            [
                *RUN,
                f"trainer.output_dir={tmp_path}",
                "data.num_workers=0",
                "trainer.max_epochs=1",
                "trainer.checkpoint_every_n_steps=0",
                "trainer.select=last",
                "data.val_classes=0",
            ],
        ),
        overwrite=True,
        run_test=False,
    )
    # one checkpoint of the new run at the epoch's end; nothing of the old one to fall back to
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.ckpt"]
    assert safe_torch_load(ckpt / "last.ckpt")["global_step"] == 6


def test_ddp_replicas_draw_their_global_batchs_seeds():
    """Each replica's sample and step seeds are those of its batch's place in the shared global
    sequence: two replicas never share a seed, and together they draw what one process draws
    over the same sequence (so the world size does not change an image's augmentation)."""
    from glassmetric.data.sampler import MPerClassBatchSampler
    from glassmetric.training.resume import ResumableBatches, step_seed

    labels = [c for c in range(8) for _ in range(6)]
    one = MPerClassBatchSampler(labels, 2, 4, seed=3, drop_last=True)
    one_batches = list(ResumableBatches(one, seed=7))
    per_rank = []
    for rank in range(2):
        ddp = MPerClassBatchSampler(labels, 2, 4, seed=3, num_replicas=2, rank=rank, drop_last=True)
        per_rank.append(list(ResumableBatches(ddp, seed=7)))
    seeds = [s for batches in per_rank for batch in batches for _, s in batch]
    assert len(set(seeds)) == len(seeds)
    for rank, batches in enumerate(per_rank):
        for b, batch in enumerate(batches):
            assert batch == one_batches[b * 2 + rank]  # same images, same seeds as one process
            assert step_seed(7, 0, b, 2, rank) == step_seed(7, 0, b * 2 + rank)
    assert step_seed(7, 0, 0, 2, 0) != step_seed(7, 0, 0, 2, 1)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    """A finished one-epoch run (multisimilarity, 16-d) to resume with changed configs."""
    out = tmp_path_factory.mktemp("one_epoch")
    fit(
        _config(
            out,
            "trainer.max_epochs=1",
            "trainer.checkpoint_every_n_steps=0",
            "trainer.select=last",
            "data.val_classes=0",
        ),
        run_test=False,
    )
    return out


@pytest.mark.parametrize(
    "changed, named",
    [
        (["model.embedding_dim=32"], ["model.embedding_dim is 32 in the config, 16 in the checkpoint"]),
        (
            ["model.groups=2", "model.pooling=max"],
            [
                "model.groups is 2 in the config, 0 in the checkpoint",
                "model.pooling is 'max' in the config, 'avg' in the checkpoint",
            ],
        ),
        (
            ["loss.name=proxyanchor"],  # the same model, but the loss has weights (proxies) the checkpoint lacks
            [
                "the weight loss.loss.proxies is absent in the checkpoint, of shape [6, 16] in the config's model",
                "loss.name is 'proxyanchor' in the config, 'multisimilarity' in the checkpoint",
            ],
        ),
    ],
)
def test_resume_with_another_model_fails_before_writing_anything(one_epoch, capsys, changed, named):
    before = {
        p: (p.read_bytes() if p.stat().st_size < 10**6 else p.stat().st_mtime_ns)
        for p in one_epoch.rglob("*")
        if p.is_file()
    }
    argv = [
        "fit",
        "--config",
        "demo_scratch",
        "--resume",
        *RUN,
        f"trainer.output_dir={one_epoch}",
        "data.num_workers=0",
        "trainer.max_epochs=2",
        "trainer.checkpoint_every_n_steps=0",
        "trainer.select=last",
        "data.val_classes=0",
        *changed,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("glassmetric fit: error: --resume: "), err
    assert str(one_epoch / "checkpoints" / "last.ckpt") in err and "--overwrite" in err
    for text in named:
        assert text in err, err
    after = {
        p: (p.read_bytes() if p.stat().st_size < 10**6 else p.stat().st_mtime_ns)
        for p in one_epoch.rglob("*")
        if p.is_file()
    }
    assert after == before  # config.yaml, checkpoints and logs untouched; no new logs/version_N


def test_resume_may_change_what_does_not_shape_the_model(one_epoch, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(one_epoch, run)
    result = fit(
        _config(
            run,
            "trainer.max_epochs=2",
            "trainer.checkpoint_every_n_steps=0",
            "trainer.select=last",
            "data.val_classes=0",
            "model.pretrained=false",
            "optim.lr=5e-4",
        ),
        resume=True,
        run_test=False,
    )
    assert safe_torch_load(result.checkpoint)["epoch"] == 1
    assert "lr: 0.0005" in (run / "config.yaml").read_text()
