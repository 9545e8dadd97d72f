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


def write_gallery(folder: Path, n: int = 16, class_name: str = "c{:02d}") -> list[Path]:
    """The first ``n`` tiny test images as ``folder/<class>/<i>.png``, the class folder named
    by ``class_name.format(label)``."""
    data = SyntheticParts("test", num_classes=8, images_per_class=4, image_size=64)
    paths = []
    for i in range(n):
        sample = data.load(i)
        path = folder / class_name.format(sample.label) / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        sample.image.save(path)
        paths.append(path)
    return paths
