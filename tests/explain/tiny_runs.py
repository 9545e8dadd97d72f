"""One-epoch checkpoints on tiny embedded data, and image files, shared by the explain tests."""

from pathlib import Path

from glassmetric.config import load_config
from glassmetric.data.synthetic import SyntheticParts
from glassmetric.training.fit import fit

#: 8 classes x 4 images at 64 px, one epoch, the last epoch kept
TINY = [
    "data.image_size=64",
    "data.resize=64",
    "data.num_workers=0",
    "data.synthetic.num_classes=8",
    "data.synthetic.images_per_class=4",
    "data.val_classes=0",
    "trainer.select=last",
    "trainer.max_epochs=1",
    "trainer.batch_size=8",
    "trainer.progress_bar=false",
]


def fit_tiny(out: Path, *overrides: str) -> Path:
    """The checkpoint of a one-epoch ``demo_scratch`` run on the tiny data, with ``overrides``."""
    return fit(
        load_config("demo_scratch", TINY + list(overrides) + [f"trainer.output_dir={out}"]), run_test=False
    ).checkpoint


def save_test_images(folder: Path, indices, image_size: int = 80) -> list[Path]:
    """Test images ``indices`` of the tiny data as PNG files (names with a space, on purpose)."""
    data = SyntheticParts("test", num_classes=8, images_per_class=4, image_size=image_size)
    paths = []
    for i in indices:
        paths.append(folder / f"bird {i}.png")
        data.load(i).image.save(paths[-1])
    return paths
