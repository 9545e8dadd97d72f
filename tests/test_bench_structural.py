"""bench/structural.py runs end to end at a tiny size and prints every table (no timing is
asserted: the numbers are the benchmark's, not the test's)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_structural_benchmark_runs_and_prints_its_tables():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "structural.py"), "--queries", "3",
         "--gallery", "150", "--repeat", "1", "--configs", "2x8"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    for heading in ("| config | ours pairs/s | (a) pairs/s", "ours, torch solver pairs/s",
                    "no-OT pipeline", "POT solve_batch (us a pair)", "native iters (mean per problem)",
                    "ours iters (mean per problem)"):
        assert heading in out, heading
    assert "| 2x2, D=8 |" in out


def test_structural_benchmark_times_the_command_line_with_and_without_early_stopping():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "structural.py"), "--cli", "40", "--cli-only", "--repeat", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    assert "glassmetric eval --rerank structural --k 100 end to end" in out
    assert "| structural.tol=null (100 iterations) |" in out and "| default (structural.tol=1e-4) |" in out
