"""Replace one marked block of BENCHMARKS.md, so each benchmark script rewrites only its own table."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_block(name: str, text: str, heading: str, path: Path = BENCHMARKS) -> None:
    """Put ``text`` between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``; where
    the markers are absent, append a new section ``## heading`` holding them."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in current:
        before, rest = current.split(begin, 1)
        current = before + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + f"\n\n## {heading}\n\n" + block + "\n"
    path.write_text(current)
    print(f"table written to {path}")
