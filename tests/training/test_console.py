"""What ``glassmetric fit`` says while it runs: a banner, one line per phase and the progress
bar on stderr; stdout holds only the results."""

import torch
from tiny_fit import SMALL, TINY_RUN

from glassmetric.cli import main


def test_fit_announces_itself_and_its_phases_on_stderr_and_prints_results_on_stdout(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "fit",
        "--config",
        "demo_scratch",
        "--baseline",
        *SMALL,
        *TINY_RUN,
        "trainer.progress_bar=true",
        f"trainer.output_dir={out}",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # trainer.accelerator: auto
    # 12 classes of 6 images: half for training (2 of those for validation), half for testing
    assert printed.err.startswith(
        f"glassmetric fit: config demo_scratch, output {out}, device {device} (devices 1, precision 32-true)\n"
        "  data synthetic: train 24 images of 4 classes; val 12 images of 2 classes; test 36 images of 6 classes\n"
        "  model resnet18, embedding 16; loss multisimilarity; 1 epoch of batches of 12\n"
    ), printed.err[:600]
    phases = [
        "evaluating the untrained model on 36 images of 6 classes ...",
        "training for 1 epoch on 24 images of 4 classes ...",
        "Epoch 0: 100%",  # Lightning's progress bar
        "testing best.ckpt on 36 images of 6 classes ...",
    ]
    at = [printed.err.find(p) for p in phases]
    assert -1 not in at and at == sorted(at), (at, printed.err[-2000:])
    lines = printed.out.strip().splitlines()
    assert lines[0] == f"test split of synthetic ({out / 'checkpoints' / 'best.ckpt'}):"
    assert lines[1].split()[:2] == ["run", "R@1"] and [line.split()[0] for line in lines[2:4]] == [
        "untrained",
        "trained",
    ]
    assert lines[4:] == [f"metrics written to {out / 'metrics.json'}"]
