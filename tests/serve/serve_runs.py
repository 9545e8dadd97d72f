"""A tiny IDML checkpoint (global, training-free structural and uncertainty explanations) and a
gallery folder of its test images, shared by the serve tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "explain"))
import tiny_runs

from glassmetric.data.synthetic import SyntheticParts

IDML = ["model.embedding_dim=16", "model.uncertainty_dim=8", "model.pooling=avgmax", "loss.similarity=introspective"]


def fit_idml(out: Path) -> Path:
    return tiny_runs.fit_tiny(out, *IDML)


def write_gallery(folder: Path, n: int = 16) -> list[Path]:
    """The first ``n`` tiny test images as ``folder/<class>/<i>.png``."""
    data = SyntheticParts("test", num_classes=8, images_per_class=4, image_size=64)
    paths = []
    for i in range(n):
        sample = data.load(i)
        path = folder / f"c{sample.label:02d}" / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        sample.image.save(path)
        paths.append(path)
    return paths
