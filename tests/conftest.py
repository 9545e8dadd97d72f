"""Shared fixtures: the real CUB-50 subset beside the project, when it exists; headless Chromium;
untrained checkpoints."""

from pathlib import Path

import pytest

#: ../shared/data/cub50 from the project root (never copied into the project)
CUB50 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cub50"


@pytest.fixture(scope="session")
def cub50_root() -> Path:
    if not (CUB50 / "images.txt").is_file():
        pytest.skip(f"real-data test: {CUB50} not found")
    return CUB50


@pytest.fixture(scope="session")
def browser_available() -> None:
    """Skip where Chromium or Playwright is absent (tests/chromium.py), unless
    GLASSMETRIC_REQUIRE_BROWSER=1 (CI): there that fails."""
    import os

    from chromium import browser_missing

    missing = browser_missing()
    if missing:
        if os.environ.get("GLASSMETRIC_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser test required (GLASSMETRIC_REQUIRE_BROWSER=1) but {missing}")
        pytest.skip(f"browser test: {missing}")


@pytest.fixture
def chromium_page(browser_available):
    """A page in a fresh headless Chromium."""
    from chromium import chromium_page as open_page

    with open_page() as page:
        yield page


@pytest.fixture
def make_checkpoint(tmp_path):
    """``make_checkpoint(*overrides) -> path``: an untrained ``demo_scratch`` model on tiny embedded data,
    saved in the layout ``glassmetric fit`` writes (weights + config), without training."""
    import torch

    from glassmetric.config import load_config
    from glassmetric.factory import build_model_from_config

    def make(*overrides: str, name: str = "untrained.ckpt"):
        cfg = load_config(
            "demo_scratch",
            [
                "data.num_workers=0",
                "data.synthetic.num_classes=8",
                "data.synthetic.images_per_class=4",
                "data.val_classes=0",
                "trainer.select=last",
                "model.embedding_dim=16",
                "eval.batch_size=16",
                *overrides,
            ],
        )
        torch.manual_seed(0)
        model = build_model_from_config(cfg)
        path = tmp_path / name
        torch.save(
            {
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "glassmetric": {"config": cfg.to_dict()},
            },
            path,
        )
        return path

    return make
