"""bench/structural.py runs end to end at a tiny size and prints every table (no timing is
asserted: the numbers are the benchmark's, not the test's)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_structural_benchmark_runs_and_prints_its_tables():
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "structural.py"),
            "--queries",
            "3",
            "--gallery",
            "150",
            "--repeat",
            "1",
            "--configs",
            "2x8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    for heading in (
        "| config | ours pairs/s | (a) pairs/s",
        "ours, torch solver pairs/s",
        "no-OT pipeline",
        "POT solve_batch (us a pair)",
        "native iters (mean per problem)",
        "ours iters (mean per problem)",
    ):
        assert heading in out, heading
    assert "| 2x2, D=8 |" in out


def test_structural_benchmark_times_the_command_line_with_and_without_early_stopping():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "structural.py"), "--cli", "40", "--cli-only", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "glassmetric eval --rerank structural --k 100 end to end" in out
    assert "| embed CPU s | knn CPU s | rerank CPU s | ot kernel CPU s |" in out
    rows = {line.split(" | ")[0]: line.split(" | ") for line in out.splitlines() if line.startswith("| ")}
    fixed, default = rows["| `structural.tol=null`"], rows["| default (`structural.tol=1e-4`)"]
    if "not counted" not in fixed[7]:  # the native kernel (a C compiler) counts the iterations
        # the command line's OT problems: exactly structural.iters with tol=null, each its own stop by default
        assert fixed[7] == "100 / 100.0 / 100 / 100"
        assert float(default[7].split(" / ")[1]) < 100
    assert fixed[-2:] == default[-2:]  # the same R@1 and MAP@R
