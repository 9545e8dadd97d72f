"""Checkpoint files: atomic writes that keep the previous version, and loads that never run
pickled code (a crafted malicious checkpoint is refused, through the API and the CLI)."""

import os
import pickle

import pytest
import torch

from glassmetric import checkpoints as checkpoint_io
from glassmetric.checkpoints import atomic_torch_save, previous_path, safe_torch_load
from glassmetric.cli import main
from glassmetric.errors import CheckpointError


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "code-was-run"
    torch.save({"state_dict": {"w": torch.ones(2)}, "glassmetric": Payload(marker)}, tmp_path / "evil.ckpt")
    (tmp_path / "raw.ckpt").write_bytes(pickle.dumps({"state_dict": Payload(marker)}))  # a plain pickle, no zip
    return tmp_path, marker


def test_a_malicious_checkpoint_is_refused_without_running_it(evil):
    folder, marker = evil
    with pytest.raises(CheckpointError) as e:
        safe_torch_load(folder / "evil.ckpt")
    assert "refused to load checkpoint" in str(e.value) and "evil.ckpt" in str(e.value)
    assert "GLOBAL posix.system" in str(e.value) or "GLOBAL os.system" in str(e.value)
    with pytest.raises(CheckpointError, match=r"refused to load checkpoint .*raw\.ckpt"):
        safe_torch_load(folder / "raw.ckpt")
    assert not marker.exists()
    # the unsafe loader would have run it: the test's payload is real
    torch.load(folder / "evil.ckpt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", ["eval", "explain", "resume"])
def test_the_cli_refuses_a_malicious_checkpoint_on_one_line(evil, capsys, command):
    folder, marker = evil
    if command == "eval":
        argv = ["eval", "--checkpoint", str(folder / "evil.ckpt")]
    elif command == "explain":
        argv = ["explain", "a.png", "b.png", "--checkpoint", str(folder / "evil.ckpt")]
    else:  # a run folder whose last.ckpt was replaced
        (folder / "run" / "checkpoints").mkdir(parents=True)
        (folder / "evil.ckpt").rename(folder / "run" / "checkpoints" / "last.ckpt")
        argv = ["fit", "--config", "demo_scratch", "--resume", f"trainer.output_dir={folder / 'run'}", "--no-test"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused to load checkpoint" in err, err
    assert not marker.exists()


def test_atomic_save_keeps_the_previous_version(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path, keep_previous=True)
    assert not previous_path(path).exists()
    atomic_torch_save({"step": 2}, path, keep_previous=True)
    atomic_torch_save({"step": 3}, path, keep_previous=True)
    assert safe_torch_load(path) == {"step": 3} and safe_torch_load(previous_path(path)) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.prev.ckpt"]  # no temporary left


def test_a_write_cut_short_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_io.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"step": 2}, path, keep_previous=True)
    monkeypatch.undo()
    assert safe_torch_load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_truncated_and_foreign_files_are_named(tmp_path):
    path = tmp_path / "cut.ckpt"
    atomic_torch_save({"w": torch.arange(1000.0)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*cut.ckpt \(truncated or not a checkpoint\)"):
        safe_torch_load(path)
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*nope\.ckpt"):
        safe_torch_load(tmp_path / "nope.ckpt")


def _cli_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_empty_and_random_files_are_named_without_blaming_pickled_code(tmp_path, capsys):
    import random

    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        safe_torch_load(empty)
    assert str(e.value) == f"cannot load checkpoint {empty}: the file is empty (0 bytes)"
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(random.Random(0).randbytes(4096))  # starts with 0xc5: no zip, no pickle opcode
    err = _cli_error(["eval", "--checkpoint", str(noise)], capsys)
    assert (
        err
        == f"glassmetric eval: error: cannot load checkpoint {noise}: not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    )
    for seed in range(1, 40):  # no random file is ever said to hold pickled code
        noise.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(CheckpointError) as e:
            safe_torch_load(noise)
        assert "cannot load checkpoint" in str(e.value) and "pickled" not in str(e.value)


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_plain_pickles_of_code_of_every_protocol_are_still_refused(tmp_path, protocol):
    marker = tmp_path / "code-was-run"
    path = tmp_path / "code.pkl"
    path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=protocol))
    with pytest.raises(CheckpointError, match=f"refused to load checkpoint {path}: it holds pickled objects"):
        safe_torch_load(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, problem",
    [
        ([1, 2], "not a glassmetric checkpoint: the top level is a list, not a mapping"),
        (torch.ones(3), "not a glassmetric checkpoint: the top level is a Tensor, not a mapping"),
        ({"epoch": 3}, "not a glassmetric checkpoint: no 'state_dict' and 'glassmetric' config (its keys: epoch)"),
        (
            {"state_dict": "weights", "glassmetric": {"config": {}}},
            "not a glassmetric checkpoint: 'state_dict' is a str, not a mapping of tensors",
        ),
        (
            {"state_dict": {"model.w": 3}, "glassmetric": {"config": {}}},
            "not a glassmetric checkpoint: 'state_dict' entry 'model.w' is a int, not a tensor",
        ),
        (
            {"state_dict": {}, "glassmetric": {"config": "demo"}},
            "not a glassmetric checkpoint: the 'glassmetric' config is a str, not a mapping",
        ),
        (
            {"state_dict": {}, "glassmetric": {"config": {"model": [1]}}},
            "not a glassmetric checkpoint: the stored config's 'model' is a list, not a mapping",
        ),
        (
            {"state_dict": {}, "glassmetric": {"config": {"seed": -1}}},
            "its stored config is invalid: seed: expected between 0",
        ),
    ],
)
def test_torch_files_that_are_not_glassmetric_checkpoints_are_named(tmp_path, capsys, content, problem):
    path = tmp_path / "other.ckpt"
    torch.save(content, path)
    err = _cli_error(["eval", "--checkpoint", str(path)], capsys)
    assert err.startswith(f"glassmetric eval: error: cannot load checkpoint {path}: {problem}"), err


def test_a_stored_config_that_does_not_fit_the_weights_is_named(make_checkpoint, capsys):
    """Another embedding_dim: the first tensor whose shape differs, both shapes (the file's, and
    nn.Linear(512, 32)'s for a ResNet-18 head of 32 dimensions); another backbone: the names."""
    path = make_checkpoint()  # ResNet-18, embedding_dim 16
    ckpt = torch.load(path, weights_only=True)
    head = ckpt["state_dict"]["model.head.linear.weight"]
    assert tuple(head.shape) == (16, 512)
    ckpt["glassmetric"]["config"]["model"]["embedding_dim"] = 32
    torch.save(ckpt, path)
    err = _cli_error(["export", "--checkpoint", str(path)], capsys)
    wider = tuple(torch.nn.Linear(512, 32).weight.shape)
    assert err == (
        f"glassmetric export: error: cannot load checkpoint {path}: the stored config (model.backbone resnet18, "
        f"model.embedding_dim 32) does not fit the weights: model.head.linear.weight is (16, 512) in the file, "
        f"{wider} in the model of the config"
    )
    ckpt["glassmetric"]["config"]["model"].update(embedding_dim=16, backbone="resnet34")  # layers resnet18 lacks
    torch.save(ckpt, path)
    err = _cli_error(["eval", "--checkpoint", str(path)], capsys)
    assert "does not fit the weights: missing ['model.backbone.trunk.layer1.2." in err and "unexpected []" in err
