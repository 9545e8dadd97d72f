"""Checkpoint files: atomic writes that keep the previous version, and loads that never run
pickled code (a crafted malicious checkpoint is refused, through the API and the CLI)."""

import os
import pickle

import pytest
import torch

from glassmetric.cli import main
from glassmetric.errors import CheckpointError
from glassmetric.training import checkpoint_io
from glassmetric.training.checkpoint_io import atomic_torch_save, previous_path, safe_torch_load


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
    with pytest.raises(CheckpointError, match="refused to load checkpoint .*raw.ckpt"):
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
        argv = ["fit", "--config", "demo", "--resume", f"trainer.output_dir={folder / 'run'}", "--no-test"]
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
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.ckpt"):
        safe_torch_load(tmp_path / "nope.ckpt")
