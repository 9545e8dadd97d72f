"""The README's "Python quick start", line for line: load a checkpoint, embed a folder, re-rank, explain a pair."""

import numpy as np
from PIL import Image


def test_python_quick_start(make_checkpoint, tmp_path, monkeypatch):
    ckpt = make_checkpoint()
    rng = np.random.default_rng(0)
    for bird in ("robin", "wren"):
        (tmp_path / "birds" / bird).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)).save(
                tmp_path / "birds" / bird / f"{i}.png"
            )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.ckpt").write_bytes(ckpt.read_bytes())

    # --- the README's lines ---
    import glassmetric

    retriever = glassmetric.Retriever.from_checkpoint("model.ckpt")
    birds = retriever.embed("birds/")
    ranked = retriever.rerank(birds, k=3)
    pair = retriever.explain("birds/robin/0.png", "birds/wren/0.png")
    # --- end ---

    assert birds.embedding.shape == (6, 16) and birds.local.shape == (6, 16, 16)
    assert ranked.indices.shape == (6, 3) and not (ranked.indices == np.arange(6)[:, None]).any()
    scores = ranked.scores.numpy()
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first by cos + SS
    plan = pair.structural.T.double()
    assert abs(float(plan.sum()) - 1.0) < 1e-3
