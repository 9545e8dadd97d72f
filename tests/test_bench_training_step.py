"""bench/training_step.py's batch of real images: the first ``samples_per_class`` images of
each of the first training classes, through the preset's training transform. The fixture's
images are solid colours, so each row of the batch names the file it was read from."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from glassmetric.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_real_batch_is_m_images_of_each_of_the_first_training_classes(tmp_path):
    fixtures = _module("cub_fixtures", ROOT / "tests" / "data" / "fixtures.py")
    bench = _module("training_step_bench", ROOT / "bench" / "training_step.py")
    fx = fixtures.write_cub(tmp_path / "cub", images_per_class=(4, 5, 4, 3, 3, 3))
    cfg = load_config(
        "cub50",
        [
            "data.train_classes=[1,3]",
            "data.test_classes=[4,6]",
            "data.val_classes=0",
            "trainer.select=last",
            "data.image_size=16",
            "data.eval_image_size=16",
            "data.resize=16",
            "trainer.batch_size=8",
        ],
    )
    half = SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    images = bench.real_batch(cfg, SimpleNamespace(model=SimpleNamespace(backbone=half)), fx.root)
    assert images.shape == (8, 3, 16, 16)

    by_class = {c: sorted(i for i, k in fx.labels.items() if k == c) for c in (1, 2)}
    expected_ids = by_class[1][:4] + by_class[2][:4]  # classes 1 and 2, m = 4, in file order
    paths = dict(line.split() for line in (fx.root / "images.txt").read_text().split("\n") if line)
    for row, image_id in zip(images, expected_ids, strict=True):
        colour = np.asarray(Image.open(fx.root / "images" / paths[str(image_id)]).convert("RGB"), np.float32)
        expected = torch.from_numpy(colour.reshape(-1, 3).mean(0) / 255 * 2 - 1)
        torch.testing.assert_close(row.mean((1, 2)), expected, rtol=0, atol=0.03)
