"""bench/study.py end to end on the embedded data with a tiny model: it trains every method and
seed, writes the tables (paired differences against scipy's t interval on the per-seed numbers
it stored), the curves and the risk-coverage figure, resumes without training again, extends a
shorter run, and lists its runs with --dry-run."""

import importlib
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
from scipy.stats import t as student_t

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.backbone=timm:test_resnet",
    "model.embedding_dim=16",
    "data.image_size=64",
    "data.resize=64",
    "data.num_workers=0",
    "data.synthetic.num_classes=12",
    "data.synthetic.images_per_class=6",
    "data.val_classes=2",
    "trainer.batch_size=12",
    "trainer.samples_per_class=3",
    "eval.batch_size=64",
]
METHODS = ["imagenet", "baseline", "structural", "introspective", "grouping-flatstart"]


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        module = importlib.import_module("study")
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def args(out: Path, *extra: str) -> list[str]:
    return [
        "--domain",
        "demo",
        "--seeds",
        "0",
        "1",
        "--methods",
        *METHODS,
        "--epochs",
        "1",
        "--pairs",
        "10",
        "--out",
        str(out / "runs"),
        "--figures",
        str(out / "figures"),
        *extra,
        "--set",
        *TINY,
    ]


@pytest.fixture(scope="module")
def finished(study, tmp_path_factory):
    """One study run; docs/results.md is a copy in the temporary folder."""
    out = tmp_path_factory.mktemp("study")
    results = out / "results.md"
    results.write_text("# Results\n\n## Kept\n\nthe sections before stay.\n")
    saved = study.RESULTS
    study.RESULTS = results
    try:
        study.main(args(out))
    finally:
        study.RESULTS = saved
    return out


def interval_cell(method: list[float], baseline: list[float]) -> str:
    diffs = [100 * (m - b) for m, b in zip(method, baseline, strict=True)]
    mean = statistics.mean(diffs)
    half = student_t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    up = sum(d > 0 for d in diffs)
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}], {up}/{len(diffs)} up"


def test_tables_hold_paired_differences_with_t_intervals(finished):
    text = (finished / "results.md").read_text()
    assert text.startswith("# Results\n\n## Kept\n\nthe sections before stay.")
    block = text.split("<!-- study-demo:begin -->")[1].split("<!-- study-demo:end -->")[0]
    stored = json.loads((finished / "runs" / "study.json").read_text())
    assert set(stored) == set(METHODS) and all(set(by) == {"0", "1"} for by in stored.values())
    base = [stored["baseline"][s]["global"] for s in ("0", "1")]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in block.splitlines() if line.startswith("| ")}
    for method, label in (
        ("structural", "structural training (`loss.similarity=structural`, 4x4)"),
        ("introspective", "introspective (`loss.similarity=introspective`)"),
    ):
        runs = [stored[method][s]["global"] for s in ("0", "1")]
        diff_rows = [line for line in block.splitlines() if line.startswith(f"| {label} | ") and " up " in line + " "]
        assert len(diff_rows) == 1, diff_rows
        cells = diff_rows[0].split(" | ")
        assert cells[1] == interval_cell([r["recall@1"] for r in runs], [r["recall@1"] for r in base])
        assert cells[3] == interval_cell([r["map_at_r"] for r in runs], [r["map_at_r"] for r in base])
    # the re-ranked baseline is paired with the baseline's global ranking of the same seed
    reranked = [stored["baseline"][s]["rerank"]["recall@1"] for s in ("0", "1")]
    label = "baseline + training-free structural re-ranking of the top 10"
    assert any(
        line.startswith(f"| {label} | {interval_cell(reranked, [b['recall@1'] for b in base])}")
        for line in block.splitlines()
    )
    # mean ± std of the baseline's R@1 in the accuracy table
    r1 = [100 * b["recall@1"] for b in base]
    assert (
        rows["baseline (MultiSimilarity)"].split(" | ")[2] == f"{statistics.mean(r1):.2f} ± {statistics.stdev(r1):.2f}"
    )
    groups = [stored["grouping-flatstart"][s]["sharpness"]["groups"] for s in ("0", "1")]
    per_group = " / ".join(
        f"{statistics.mean(g[k]['mass_positions'] for g in groups):.1f}" for k in ("1", "2", "3", "4")
    )
    sharp_row = rows["attentive groups, near-uniform start (`model.group_query_std=0.1`)"]
    assert sharp_row.split(" | ")[2] == per_group, sharp_row
    for section in (
        "failure AUROC",
        "IDML -‖u_q‖",
        "Keypoint transfer",
        "best epoch 1 of 1",
        "(study_demo_curves.png)",
        "(study_demo_risk_coverage.png)",
    ):
        assert section in block


def test_figures_and_curves(finished):
    for name in ("study_demo_curves.png", "study_demo_risk_coverage.png"):
        assert (finished / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads((finished / "runs" / "study.json").read_text())
    curve = stored["baseline"]["0"]["curve"]
    assert len(curve["map_at_r"]) == len(curve["recall@1"]) == 1 and 0 <= curve["map_at_r"][0] <= 1


def test_a_second_call_retrains_nothing_and_prints_the_same_tables(study, finished, monkeypatch):
    def no_training(*a, **kw):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(study, "fit", no_training)
    block = (finished / "results.md").read_text().split("<!-- study-demo:begin -->")[1].split("\n\n", 1)[1]
    again = study.main(args(finished, "--no-write"))
    assert again["text"].split("\n\n", 1)[1] == block.split("\n<!-- study-demo:end -->")[0]


def test_dry_run_lists_finished_and_new_runs(study, finished, capsys):
    study.main(args(finished, "--dry-run", "--methods", "baseline", "grouping"))
    out = capsys.readouterr().out
    assert "| baseline | 0 | done | 0 |" in out and "| baseline | 1 | done | 0 |" in out
    assert "| grouping | 0 | new | 1 |" in out and "Estimated total:" in out


def test_run_state_extends_a_shorter_run(study, tmp_path):
    folder = tmp_path / "run"
    assert study.run_state(folder, 3) == "new"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert study.run_state(folder, 3) == "resume"
    (folder / "checkpoints" / "best.ckpt").write_bytes(b"")
    (folder / "done").write_text(json.dumps({"epochs": 2}))
    assert study.run_state(folder, 3) == "resume"
    assert study.run_state(folder, 2) == "done"


def test_stopped_rising_by_hand(study):
    from study_stats import stopped_rising

    assert stopped_rising([[0.1, 0.3, 0.2, 0.2]]) == ("stopped", 2)  # best epoch before the last two
    assert stopped_rising([[0.1, 0.2, 0.3]]) == ("still rising", 3)
    # best at the last epoch, but a rise of 0.01 over the last three epochs, within the noise of
    # the last epoch's mean (std 0.127 over 2 seeds: 0.09)
    assert stopped_rising([[0.30, 0.30, 0.40], [0.30, 0.31, 0.22]]) == ("stopped", 3)
    assert stopped_rising([[0.1, 0.2, 0.4], [0.1, 0.2, 0.41]]) == ("still rising", 3)
    assert stopped_rising([[0.1, 0.2]]) == ("too short", 2)


def test_validation_curve_reads_every_log_version(study, tmp_path):
    from study_stats import validation_curve

    header = "epoch,step,train/loss,val/map_at_r,val/recall@1\n"
    for version, rows in (
        (0, ["0,1,0.5,,", "0,1,,0.10,0.50", "1,2,,0.20,0.60"]),
        (1, ["1,2,,0.25,0.65", "2,3,,0.30,0.70"]),  # a resumed run logs epoch 1 again
    ):
        folder = tmp_path / "logs" / f"version_{version}"
        folder.mkdir(parents=True)
        (folder / "metrics.csv").write_text(header + "\n".join(rows) + "\n")
    assert validation_curve(tmp_path) == {"map_at_r": [0.10, 0.25, 0.30], "recall@1": [0.50, 0.65, 0.70]}


def test_more_epochs_extend_a_finished_run_from_its_last_checkpoint(study, finished):
    """Runs last: it trains the baseline of seed 0 on to a second epoch."""
    folder = finished / "runs" / "baseline-seed0"
    before = (folder / "logs" / "version_0" / "metrics.csv").read_text()
    extra = ["--methods", "baseline", "--seeds", "0", "--epochs", "2", "--no-write"]
    result = study.main(args(finished, *extra))
    assert (folder / "logs" / "version_0" / "metrics.csv").read_text() == before
    assert (folder / "logs" / "version_1" / "metrics.csv").is_file()
    assert len(result["runs"]["baseline"][0]["curve"]["map_at_r"]) == 2
    assert json.loads((folder / "done").read_text()) == {"epochs": 2}
