"""Pretrained-only reference rows of the real-data presets: each preset's untrained model
(ImageNet features through the identity-initialised head, the preset's evaluation transform)
scored on its test classes, the row that metric training has to beat.

    GLASSMETRIC_DATA_ROOT=/path/to/data python bench/pretrained_reference.py [--presets cub75 cars98] [--no-write]

GLASSMETRIC_DATA_ROOT defaults to ../shared/data beside the project. The table replaces the
block between the ``pretrained-reference`` markers in docs/training.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from markdown_block import write_block

from glassmetric import Retriever

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "docs" / "training.md"
COLUMNS = ["recall@1", "recall@2", "recall@4", "recall@8", "r_precision", "map_at_r", "nmi"]
#: what each preset's test split is, for the table
TEST_SPLIT = {
    "cub50": "CUB-200-2011 classes 26-50",
    "cub75": "CUB-200-2011 classes 26-50",
    "cars98": "Stanford Cars classes 50-98",
}


def reference_row(preset: str) -> tuple[str, float]:
    """The markdown row of ``preset``'s untrained model on its test split, and the seconds it took."""
    start = time.perf_counter()
    retriever = Retriever.from_preset(preset, device="cpu")
    _, queries, gallery = retriever.eval_data()
    metrics = retriever.evaluate(queries, gallery)
    cells = " | ".join(f"{100 * metrics[c]:.2f}" for c in COLUMNS)
    split = f"{TEST_SPLIT.get(preset, 'test split')} ({len(queries):,} images)"
    return f"| `{preset}` | {split} | {cells} |", time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["cub75", "cars98"])
    parser.add_argument("--no-write", action="store_true", help="print the table without writing docs/training.md")
    args = parser.parse_args()
    os.environ.setdefault("GLASSMETRIC_DATA_ROOT", str(ROOT.parent / "shared" / "data"))
    rows = []
    for preset in args.presets:
        row, seconds = reference_row(preset)
        print(f"{row}   ({seconds:.0f} s)", flush=True)
        rows.append(row)
    command = " ".join(["python bench/pretrained_reference.py", *sys.argv[1:]])
    text = "\n".join(
        [
            "| preset, untrained | test split | R@1 | R@2 | R@4 | R@8 | R-Precision | MAP@R | NMI |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"`{command}`, on {os.cpu_count()} CPU cores shared with other jobs (torch {torch.__version__}).",
        ]
    )
    print(text)
    if not args.no_write:
        write_block("pretrained-reference", text, "Pretrained-only reference", path=README)


if __name__ == "__main__":
    main()
