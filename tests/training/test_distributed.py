"""Data-parallel training and evaluation on 2 CPU processes (gloo), against one process."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from glassmetric.checkpoints import load_trained
from glassmetric.config import load_config
from glassmetric.factory import make_splits
from glassmetric.retrieval.embed import embed_dataset
from glassmetric.retrieval.metrics import retrieval_metrics
from glassmetric.training.distributed import IndexedDataset, ddp_strategy, device_count, gather_unique, world

HERE = Path(__file__).parent
SRC = Path(__file__).resolve().parents[2] / "src"


def _env() -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    )
    env.pop("LOCAL_RANK", None)
    return env


def _run(cmd: list[str], timeout: int = 240) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_processes_give_the_one_process_gradients_and_embeddings(tmp_path):
    out = tmp_path / "report.json"
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(HERE / "ddp_worker.py"),
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    assert set(report["training"]) == {
        "multisimilarity",
        "structural_contrastive",
        "groups_proxyanchor",
        "introspective",
    }
    for name, r in report["training"].items():
        assert r["loss"] == pytest.approx(r["reference_loss"], rel=1e-5), name
        assert r["same_parameters"], name
        assert r["max_grad_diff"] < 1e-5, name  # relative to the largest gradient entry
    e = report["evaluation"]
    assert e["rows"] == 23 and e["same_labels"] and e["max_embedding_diff"] < 1e-5
    assert e["metrics"] == e["reference_metrics"]
    assert e["skip_rows"] == 22 and e["skip_index"] == e["skip_reference_index"]
    assert 7 not in e["skip_index"] and e["skip_max_embedding_diff"] < 1e-5


def test_ddp_fit_on_two_processes_validates_like_one(tmp_path):
    """A 2-process Lightning DDP run (with attentive groups, whose global head gets no gradient)
    completes, and its validation metrics equal one process's on the saved weights."""
    overrides = [
        "data.image_size=64",
        "data.resize=64",
        "data.num_workers=0",
        "data.synthetic.num_classes=20",
        "data.synthetic.images_per_class=5",
        "data.val_classes=3",
        "model.embedding_dim=16",
        "model.groups=2",
        "trainer.batch_size=8",
        "trainer.samples_per_class=2",
        "trainer.max_epochs=1",
        "trainer.select=last",
        "trainer.progress_bar=false",
        "trainer.log_every_n_steps=1",
        "eval.batch_size=4",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        f"trainer.output_dir={tmp_path}",
    ]
    _run([sys.executable, "-m", "glassmetric.cli", "fit", "--config", "demo_scratch", "--overwrite", *overrides])
    assert "test" in json.loads((tmp_path / "metrics.json").read_text())
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = next(r for r in rows if r.get("val/recall@1"))
    assert sum(1 for r in rows if r.get("train/loss_step")) == 2  # 4 batches of 8 from 35 images: 2 per rank

    model, cfg = load_trained(str(tmp_path / "checkpoints" / "last.ckpt"))
    val = make_splits(cfg, model).val
    assert len(val) == 15  # odd: the validation sampler padded one shard
    emb, labels = embed_dataset(model, val, batch_size=4, device="cpu")
    reference = retrieval_metrics(emb, labels, include=("recall", "r_precision", "map_at_r"))
    for name, value in reference.items():
        assert float(logged[f"val/{name}"]) == pytest.approx(value, abs=1e-6), name


def test_gather_unique_on_one_process_places_rows_and_drops_repeats():
    assert world() == (1, 0)
    index = torch.tensor([2, 0, 3, 1, 2])  # item 2 twice, as a padded shard repeats it
    rows = torch.tensor([[2.0], [0.0], [3.0], [1.0], [2.0]])
    out = gather_unique({"x": rows, "y": rows[:, 0].long()}, index)
    assert torch.equal(out["x"][:, 0], torch.arange(4.0)) and torch.equal(out["y"], torch.arange(4))
    with pytest.raises(ValueError, match="1 of 5 items are on no rank"):
        gather_unique({"x": rows}, index, size=5)
    # images skipped under data.on_bad_image: skip are on no rank: left out, order kept
    kept = gather_unique({"x": rows}, index, size=5, drop_missing=True)["x"]
    assert torch.equal(kept, out["x"])


def test_indexed_dataset_adds_the_index():
    data = IndexedDataset([{"image": torch.zeros(1), "label": 7}] * 3)
    assert len(data) == 3 and data[2]["index"] == 2 and data[2]["label"] == 7


def test_strategy_from_config():
    assert ddp_strategy(load_config("demo_scratch")) == "auto"
    plain = ddp_strategy(load_config("demo_scratch", ["trainer.devices=4"]))
    assert isinstance(plain, DDPStrategy) and not plain._ddp_kwargs.get("find_unused_parameters")
    grouped = ddp_strategy(load_config("demo_scratch", ["trainer.strategy=ddp", "model.groups=2"]))
    assert grouped._ddp_kwargs["find_unused_parameters"] is True
    assert isinstance(ddp_strategy(load_config("demo_scratch", ["trainer.num_nodes=2"])), DDPStrategy)


def test_device_count_reads_lightnings_devices():
    assert [device_count(d) for d in (1, 3, "2", "0,1", "0,")] == [1, 3, 2, 2, 1]
    assert device_count("auto", "cpu") == 1
    assert device_count("auto", "gpu") == max(1, torch.cuda.device_count())
    assert isinstance(ddp_strategy(load_config("demo_scratch", ["trainer.devices=0,1"])), DDPStrategy)


def test_devices_this_machine_lacks_are_named(monkeypatch, tmp_path, capsys):
    """``trainer.accelerator=gpu`` without a GPU, more GPUs or other indices than there are,
    GPU indices on the CPU: one line naming the key, before anything is built or written."""
    from glassmetric.cli import main
    from glassmetric.errors import ConfigError
    from glassmetric.training.distributed import check_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    out = tmp_path / "run"
    assert main(["fit", "--config", "demo_scratch", "trainer.accelerator=gpu", f"trainer.output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "glassmetric fit: error: trainer.accelerator: 'gpu', but torch finds no CUDA GPU here: use cpu or auto"
    )
    assert not out.exists()

    def trainer(*o):
        return load_config("demo_scratch", list(o)).trainer

    with pytest.raises(ConfigError, match=r"trainer\.devices: GPU indices '0,1' on the CPU"):
        check_devices(trainer("trainer.devices=[0, 1]"))
    check_devices(trainer("trainer.devices=2", "trainer.accelerator=cpu"))  # two CPU processes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"trainer\.devices: 4 GPUs asked for, this machine has 2"):
        check_devices(trainer("trainer.devices=4", "trainer.accelerator=cuda"))
    with pytest.raises(ConfigError, match=r"trainer.devices: GPU 3 does not exist here \(GPUs 0 to 1\)"):
        check_devices(trainer("trainer.devices=[0, 3]"))
    check_devices(trainer("trainer.devices=[1]", "trainer.accelerator=gpu"))
    check_devices(trainer("trainer.devices=auto"))
