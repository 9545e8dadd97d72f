"""The output folder of a run: one run at a time, and ``--overwrite`` leaves only the new run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback
from tiny_fit import SMALL, TINY_RUN

from glassmetric.checkpoints import safe_torch_load
from glassmetric.cli import main
from glassmetric.config import load_config
from glassmetric.errors import OutputError
from glassmetric.training.fit import fit
from glassmetric.training.run_folder import is_launching_process, run_folder_lock

SRC = Path(__file__).resolve().parents[2] / "src"
TINY = [*SMALL, *TINY_RUN]


def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_overwrite_leaves_only_the_new_run_and_the_users_files(tmp_path, capsys):
    out = tmp_path / "run"
    fit(load_config("demo_scratch", [*TINY, "trainer.select=val", f"trainer.output_dir={out}"]))
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "metrics.json").is_file()
    (out / "notes.txt").write_text("mine")
    (out / "report").mkdir()
    (out / "report" / "index.html").write_text("<html>")  # glassmetric report -o run/report
    (out / "logs" / "version_0" / "mine.txt").write_text("mine too")
    capsys.readouterr()

    argv = [
        "fit",
        "--config",
        "demo_scratch",
        "--overwrite",
        *TINY,
        "trainer.select=last",
        "model.embedding_dim=8",
        f"trainer.output_dir={out}",
    ]
    assert main(argv) == 0
    assert "kept what glassmetric fit did not write" in capsys.readouterr().out
    files = [f for f in tree(out) if not f.startswith("logs/") and f != ".fit.lock"]
    assert files == ["checkpoints/last.ckpt", "config.yaml", "metrics.json", "notes.txt", "report/index.html"]
    # the earlier run's log files are gone; its folder stays for the file put there, so the new run logs to version_1
    logs = [f for f in tree(out) if f.startswith("logs/")]
    assert logs[0] == "logs/version_0/mine.txt" and all(f.startswith("logs/version_1/") for f in logs[1:])
    assert {"metrics.csv", "hparams.yaml"} <= {f.split("/")[-1] for f in logs[1:]}
    # what is there is the new run's: its checkpoint, its config, its metrics
    assert json.loads((out / "metrics.json").read_text())["checkpoint"] == str(out / "checkpoints" / "last.ckpt")
    assert "embedding_dim: 8" in (out / "config.yaml").read_text()
    assert safe_torch_load(out / "checkpoints" / "last.ckpt")["state_dict"]["model.head.linear.weight"].shape[0] == 8


class SecondRun(Callback):
    """Starts a second ``glassmetric fit`` into the same folder while this run trains."""

    def __init__(self, argv):
        self.argv, self.result = argv, None

    def on_train_epoch_start(self, trainer, pl_module):
        self.result = main(self.argv)


def test_a_second_run_into_a_busy_folder_fails_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    second = SecondRun(
        ["fit", "--config", "demo_scratch", "--overwrite", *TINY, "model.embedding_dim=8", f"trainer.output_dir={out}"]
    )
    first = fit(
        load_config("demo_scratch", [*TINY, "trainer.select=last", f"trainer.output_dir={out}"]), callbacks=[second]
    )
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert second.result == 2
    assert len(err.splitlines()) == 1 and err.startswith("glassmetric fit: error: "), err
    assert f"trainer.output_dir {out} is in use by another glassmetric fit (pid {os.getpid()} on " in err
    # the folder holds the first run only
    assert first.test_metrics and json.loads((out / "metrics.json").read_text())["test"] == pytest.approx(
        first.test_metrics
    )
    assert "embedding_dim: 16" in (out / "config.yaml").read_text()
    assert safe_torch_load(out / "checkpoints" / "last.ckpt")["state_dict"]["model.head.linear.weight"].shape[0] == 16
    # the lock went with the first run: the next one starts
    with run_folder_lock(out):
        pass


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom glassmetric.training.run_folder import run_folder_lock\n"
            "with run_folder_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n",
            str(tmp_path),
        ],
        env=dict(os.environ, PYTHONPATH=str(SRC)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with (
            pytest.raises(OutputError, match=rf"in use by another glassmetric fit \(pid {holder.pid} on "),
            run_folder_lock(tmp_path),
        ):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with run_folder_lock(tmp_path):  # no stale lock after kill -9
        pass


@pytest.mark.parametrize(
    "env, launching",
    [
        ({}, True),
        ({"LOCAL_RANK": "0"}, True),
        ({"LOCAL_RANK": "1"}, False),  # a rank Lightning's launcher started
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # rank 0 of the second node
        ({"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}, True),  # torchrun
        ({"RANK": "3", "LOCAL_RANK": "1"}, False),
        ({"SLURM_PROCID": "1"}, False),
    ],
)
def test_only_the_launching_process_holds_the_lock(monkeypatch, env, launching):
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert is_launching_process() is launching
