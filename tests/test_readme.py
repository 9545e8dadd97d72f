"""Every fenced code block of README.md runs, as the README has it (read from the file, not copied).

A workspace holds a small generated labelled folder named as the README names it
(``birds/train/<class>/<i>.png``, ``birds/test/<class>/<i>.png``). Python blocks are executed
there. In bash blocks every ``glassmetric`` line runs through the CLI in-process, with the few
arguments of :data:`TINY` appended so that it takes seconds (small images, one epoch, a short
report); ``serve`` answers one request and returns instead of serving until Ctrl-C. ``pip`` and
``make`` lines are not run (:data:`NOT_RUN` says why); any other command fails the test, so no
line is skipped silently.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"

#: arguments appended to each README command, by verb, so that it runs in seconds
TINY: dict[str, list[str]] = {
    "fit": [
        "data.image_size=64",
        "data.resize=64",
        "data.eval_image_size=64",
        "data.num_workers=0",
        "data.val_classes=1",
        "trainer.max_epochs=1",
        "trainer.batch_size=6",
        "trainer.samples_per_class=2",
        "trainer.progress_bar=false",
        "trainer.log_every_n_steps=1",
        "eval.batch_size=16",
    ],
    "report": ["--queries", "1", "--top", "3", "--k", "0,10"],
    "serve": ["--port", "0", "--device", "cpu"],  # --cache-dir is added per workspace
}
#: commands of the README's bash blocks that the test does not run, and why
NOT_RUN = {
    "pip": "installs the package: the tests run in the environment it made",
    "make": "make demo trains for minutes and make test runs this suite; the Makefile is read by CI",
}
TRAIN_CLASSES = ("robin", "wren", "finch", "tit")
TEST_CLASSES = ("heron", "stork", "crane")


def all_blocks() -> list[tuple[str, str]]:
    """(language, body) of every fenced block of the README, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def fenced_blocks(language: str) -> list[str]:
    """The README's fenced blocks in ``language``, in order."""
    return [body for lang, body in all_blocks() if lang == language]


def commands(block: str) -> list[list[str]]:
    """The shell commands of a bash block, comments dropped and continued lines joined."""
    joined = re.sub(r"\\\n", " ", block)
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def write_birds(root: Path) -> None:
    """Four images a class; each class a colour of its own plus noise, so that classes differ."""
    rng = np.random.default_rng(0)
    for split, classes in (("train", TRAIN_CLASSES), ("test", TEST_CLASSES)):
        for name in classes:
            folder = root / "birds" / split / name
            folder.mkdir(parents=True)
            colour = rng.integers(0, 255, (1, 1, 3))
            for i in range(4):
                pixels = np.clip(colour + rng.normal(0, 40, (72, 72, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_the_readme_has_only_blocks_this_test_runs():
    languages = [lang for lang, _ in all_blocks()]
    assert languages and set(languages) <= {"bash", "python"}, languages
    assert fenced_blocks("python") and any(
        cmd[0] == "glassmetric" for b in fenced_blocks("bash") for cmd in commands(b)
    )


def test_every_bash_line(tmp_path, monkeypatch, capsys):
    import uvicorn
    from fastapi.testclient import TestClient

    from glassmetric.cli import main

    served = []

    def answer_once(self, sockets=None):
        """uvicorn.Server.run: the app the command built answers /api/info, then the server stops."""
        with TestClient(self.config.app, base_url="http://127.0.0.1") as client:
            served.append(client.get("/api/info"))
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", answer_once)
    write_birds(tmp_path)
    monkeypatch.chdir(tmp_path)
    ran = []
    for block in fenced_blocks("bash"):
        for words in commands(block):
            if words[0] in NOT_RUN:
                continue
            assert words[0] == "glassmetric", f"README command the test cannot run: {shlex.join(words)}"
            verb = words[1]
            extra = TINY.get(verb, []) + (["--cache-dir", str(tmp_path / "cache")] if verb == "serve" else [])
            assert main([*words[1:], *extra]) == 0, shlex.join(words)
            ran.append(verb)
    out = capsys.readouterr().out
    assert ran == ["fit", "eval", "eval", "explain", "report", "serve"]
    assert "K=10" in out  # the re-ranking line printed its sweep
    assert (tmp_path / "runs/birds/checkpoints/best.ckpt").is_file()
    assert (tmp_path / "pair.png").is_file() and (tmp_path / "runs/birds/report/index.html").is_file()
    assert len(served) == 1 and served[0].status_code == 200


def test_every_python_block(make_checkpoint, tmp_path, monkeypatch):
    write_birds(tmp_path)
    checkpoint = tmp_path / "runs/birds/checkpoints/best.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(make_checkpoint().read_bytes())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in fenced_blocks("python"):
        exec(compile(block, str(README), "exec"), namespace)

    gallery, neighbours, ranked, metrics = (namespace[k] for k in ("gallery", "neighbours", "ranked", "metrics"))
    n = len(TEST_CLASSES) * 4
    assert gallery.embedding.shape[0] == n and sorted({Path(p).parent.name for p in gallery.paths}) == sorted(
        TEST_CLASSES
    )
    # the kNN against brute force: every cosine, each image left out of its own results
    cosines = gallery.embedding @ gallery.embedding.T
    cosines.fill_diagonal_(-torch.inf)
    expected = cosines.topk(5, dim=1)
    assert torch.allclose(namespace["scores"], expected.values, atol=1e-5)
    assert (neighbours != torch.arange(n)[:, None]).all()
    assert ranked.indices.shape == (n, 10) and not (ranked.indices == torch.arange(n)[:, None]).any()
    assert set(metrics) == {0, 10} and 0 <= metrics[10]["recall@1"] <= 1
    plan = namespace["pair"].structural.T.double()
    assert float(plan.sum()) == pytest.approx(1.0, abs=1e-3)
    assert namespace["baseline"].checkpoint is None
