"""Output paths: atomic writes get the umask's mode, and every command checks the paths it
writes before any work, failing on one line that names the path."""

import json
import os
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_fit import SMALL, TINY_RUN

from glassmetric.checkpoints import atomic_torch_save
from glassmetric.cli import main
from glassmetric.outputs import atomic_write_text

SRC = Path(__file__).resolve().parents[1] / "src"


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def plain_mode(folder: Path) -> int:
    """The mode a file made by a plain open() gets under the current umask (the reference)."""
    probe = folder / "plain-open-reference"
    probe.write_text("x")
    try:
        return mode(probe)
    finally:
        probe.unlink()


def save_images(folder: Path, n: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / f"img {i}.png" for i in range(n)]
    for p in paths:
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
    return paths


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o027])
def test_atomic_writes_follow_the_umask(tmp_path, mask):
    with umask(mask):
        atomic_torch_save({"w": 1}, tmp_path / "a.ckpt")
        atomic_torch_save({"w": 2}, tmp_path / "a.ckpt", keep_previous=True)
        atomic_write_text(tmp_path / "m.json", "{}")
        expected = plain_mode(tmp_path)
    assert expected == 0o666 & ~mask
    for name in ("a.ckpt", "a.prev.ckpt", "m.json"):
        assert mode(tmp_path / name) == expected, name


def test_gallery_caches_follow_the_umask(tmp_path, make_checkpoint):
    from glassmetric.checkpoints import load_trained
    from glassmetric.serve.gallery import folder_source, load_gallery

    ckpt = make_checkpoint(*SMALL)
    model, cfg = load_trained(str(ckpt))
    for c in ("a", "b"):
        save_images(tmp_path / "gallery" / c)
    with umask(0o022):
        gallery = load_gallery(
            model,
            cfg,
            ckpt,
            folder_source(tmp_path / "gallery"),
            ("embedding",),
            cache_dir=tmp_path / "cache",
            progress=False,
        )
        expected = plain_mode(tmp_path)
    assert not gallery.from_cache and mode(gallery.cache_file) == expected == 0o644


def test_a_fit_run_writes_every_file_with_the_umasks_mode(tmp_path):
    from glassmetric.config import load_config
    from glassmetric.training.fit import fit

    cfg = load_config(
        "demo_scratch", [*SMALL, *TINY_RUN, "trainer.select=val", f"trainer.output_dir={tmp_path / 'run'}"]
    )
    with umask(0o027):
        fit(cfg)
        expected = plain_mode(tmp_path)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    names = {p.relative_to(tmp_path / "run").as_posix() for p in files}
    assert {"checkpoints/best.ckpt", "checkpoints/last.ckpt", "metrics.json", "config.yaml"} <= names
    assert {p.name: oct(mode(p)) for p in files} == {p.name: oct(expected) for p in files}


# ------------------------------------------------------------------ paths checked before any work


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"glassmetric {command}: error: "), err
    return err


def test_explain_wants_a_figure_file(tmp_path, make_checkpoint, capsys):
    ckpt = make_checkpoint(*SMALL)
    images = [str(p) for p in save_images(tmp_path / "images")]
    assert main(["explain", *images, "--checkpoint", str(ckpt), "-o", str(tmp_path / "x.txt")]) == 2
    err = one_line_error(capsys, "explain")
    assert "x.txt" in err and ".png" in err and "'.txt'" in err
    (tmp_path / "folder").mkdir()
    assert main(["explain", *images, "--checkpoint", str(ckpt), "-o", str(tmp_path / "folder")]) == 2
    assert "folder is a folder: expected a file name" in one_line_error(capsys, "explain")
    # checked before the checkpoint is even read
    assert main(["explain", *images, "--checkpoint", str(tmp_path / "nope.ckpt"), "-o", str(tmp_path / "x.txt")]) == 2
    assert "x.txt" in one_line_error(capsys, "explain")
    assert main(["explain", *images, "--checkpoint", str(ckpt), "-o", str(tmp_path / "figs" / "p.svg")]) == 0
    assert (tmp_path / "figs" / "p.svg").read_text().lstrip().startswith("<?xml")


def test_eval_out_is_checked_before_the_metrics_and_its_folder_is_created(tmp_path, make_checkpoint, capsys):
    ckpt = make_checkpoint(*SMALL)
    (tmp_path / "a file").write_text("not a folder")
    assert (
        main(["eval", "--checkpoint", str(ckpt), "--device", "cpu", "--out", str(tmp_path / "a file" / "m.json")]) == 2
    )
    err = one_line_error(capsys, "eval")
    assert "m.json" in err and "is a file, not a folder" in err
    assert "R@1" not in capsys.readouterr().out  # nothing was computed
    for flag, value in (("--out", tmp_path), ("--uncertainty-csv", tmp_path), ("--groups-figure", tmp_path / "g.txt")):
        assert main(["eval", "--checkpoint", str(ckpt), "--device", "cpu", flag, str(value)]) == 2
        assert flag in one_line_error(capsys, "eval")
    out = tmp_path / "missing" / "dir" / "m.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--device", "cpu", "--out", str(out)]) == 0
    assert "recall@1" in json.loads(out.read_text())["metrics"]


def test_report_and_export_and_serve_refuse_a_file_where_a_folder_goes(tmp_path, make_checkpoint, capsys):
    ckpt = make_checkpoint(*SMALL)
    (tmp_path / "a file").write_text("x")
    assert main(["report", "--checkpoint", str(ckpt), "-o", str(tmp_path / "a file"), "--device", "cpu"]) == 2
    assert "a file is a file: expected a folder" in one_line_error(capsys, "report")
    assert main(["export", "--checkpoint", str(ckpt), "-o", str(tmp_path)]) == 2
    assert "is a folder: expected a file name" in one_line_error(capsys, "export")
    assert (
        main(["serve", "--checkpoint", str(ckpt), "--cache-dir", str(tmp_path / "a file" / "cache"), "--device", "cpu"])
        == 2
    )
    assert "--cache-dir" in one_line_error(capsys, "serve")
    assert main(["fit", "--config", "demo_scratch", f"trainer.output_dir={tmp_path / 'a file'}"]) == 2
    assert "trainer.output_dir" in one_line_error(capsys, "fit")


def _without_permission_override() -> None:
    """In the child before exec: drop CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER from
    the capability bounding set, so that even root gets the folder's permission bits."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def unwritable(tmp_path):
    """``(folder, run)``: a read-only folder (0555) and ``run(argvs)``, which runs the command
    lines in one subprocess that cannot write into it, not even as root, and returns each one's
    exit status and stderr."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    os.chmod(folder, 0o555)

    def run(argvs: list[list[str]]) -> list[tuple[int, str]]:
        script = (
            "import contextlib, io, json, sys\nfrom glassmetric.cli import main\nresults = []\n"
            "for argv in json.loads(sys.argv[1]):\n    err = io.StringIO()\n"
            "    with contextlib.redirect_stderr(err):\n        rc = main(argv)\n"
            "    results.append([rc, err.getvalue()])\nprint(json.dumps(results))\n"
        )
        env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
        preexec = _without_permission_override if os.geteuid() == 0 else None
        proc = subprocess.run(
            [sys.executable, "-c", script, json.dumps(argvs)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            preexec_fn=preexec,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]

    yield folder, run
    os.chmod(folder, 0o755)


def test_unwritable_output_paths_fail_on_one_line_before_any_work(unwritable, make_checkpoint):
    folder, run = unwritable
    ckpt = make_checkpoint(*SMALL)
    images = [str(p) for p in save_images(folder.parent / "images")]
    commands = {
        "fit": ["fit", "--config", "demo_scratch", f"trainer.output_dir={folder / 'run'}"],
        "eval": ["eval", "--checkpoint", ckpt, "--device", "cpu", "--out", str(folder / "m.json")],
        "report": ["report", "--checkpoint", ckpt, "--device", "cpu", "-o", str(folder / "report")],
        "explain": ["explain", *images, "--checkpoint", ckpt, "-o", str(folder / "p.png")],
        "export": ["export", "--checkpoint", ckpt, "-o", str(folder / "m.onnx")],
        "serve": ["serve", "--checkpoint", ckpt, "--device", "cpu", "--cache-dir", str(folder / "cache")],
    }
    results = run([[str(a) for a in argv] for argv in commands.values()])
    for command, (rc, err) in zip(commands, results, strict=True):
        assert rc == 2, (command, err)
        line = err.strip()
        assert len(line.splitlines()) == 1 and line.startswith(f"glassmetric {command}: error: "), line
        assert str(folder) in line and "Permission denied" in line, line
    assert not any(folder.iterdir())
