"""Shared fixtures: the real CUB-50 subset beside the project, when it exists."""

from pathlib import Path

import pytest

#: ../shared/data/cub50 from the project root (never copied into the project)
CUB50 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cub50"


@pytest.fixture(scope="session")
def cub50_root() -> Path:
    if not (CUB50 / "images.txt").is_file():
        pytest.skip(f"real-data test: {CUB50} not found")
    return CUB50
