"""The user documentation: it describes the product as it is (no development history), its links
and images resolve, and the option reference matches the config dataclasses."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from glassmetric import config_reference
from glassmetric.config import Config

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "RELIABILITY.md", *(ROOT / "docs").glob("*.md")])
SOURCES = sorted((ROOT / "src").rglob("*.py"))

#: phrases that tell the project's history instead of the product
HISTORY = [
    r"\bsessions? \d",
    r"\bround \d",
    r"\bthis round\b",
    r"\bas before\b",
    r"\bpreviously\b",
    r"(?<!\bbe )(?<!\bis )(?<!\bwas )(?<!\bare )(?<!\bwere )(?<!\bnever )\bused to\b",
    r"\b(targets?|goals?) (is |are |was |were )?(not )?met\b",
    r"\bcommit [0-9a-f]{7,40}\b",
]
#: a word that looks like an abbreviated commit hash: 7-40 hex digits, letters and digits both
COMMIT_HASH = r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b"


def test_pages_and_sources_exist():
    assert len(PAGES) > 5 and (ROOT / "docs" / "configuration.md") in PAGES and SOURCES


@pytest.mark.parametrize("pattern", HISTORY)
def test_no_development_history(pattern):
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}"
        for path in [*PAGES, *SOURCES]
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(pattern, line, flags=re.I)
    ]
    assert not hits, "\n".join(hits)


def test_no_commit_hashes_in_the_documentation():
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {word}"
        for path in PAGES
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        for word in re.findall(COMMIT_HASH, line)
    ]
    assert not hits, "\n".join(hits)


def test_no_paths_of_one_machine_in_the_documentation():
    hits = [str(path.relative_to(ROOT)) for path in PAGES if "../shared/" in path.read_text(encoding="utf-8")]
    assert not hits


def test_the_history_patterns_catch_history():
    """The patterns are not vacuous: each catches the phrase it is for, and none a product sentence."""
    history = [
        "measured in session 5",
        "Round 3 of the work",
        "this round",
        "as before, the cache",
        "previously the cache",
        "re-ranking used to lower R@1",
        "targets met",
        "the 5x target is not met",
        "at commit 6ef95d1",
    ]
    assert all(any(re.search(p, text, flags=re.I) for p in HISTORY) for text in history)
    product = ["the test split is never used to select anything", "they were used to choose", "refused to load"]
    assert not any(re.search(p, text, flags=re.I) for p in HISTORY for text in product)
    assert re.findall(COMMIT_HASH, "at 6ef95d1 and aaf159a") == ["6ef95d1", "aaf159a"]
    assert not re.findall(COMMIT_HASH, "R@1 73.46, 1487 images, 1,000,000 vectors, p 2.9e-18, 9.99724e-05")


def _links(path: Path) -> list[str]:
    """Relative targets of the Markdown links and images of ``path``, without their #anchor."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)  # not in code
    targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_every_relative_link_and_image_resolves():
    missing = [
        f"{path.relative_to(ROOT)}: {target}"
        for path in PAGES
        for target in _links(path)
        if not (path.parent / target).exists()
    ]
    assert not missing, "\n".join(missing)
    assert "docs/birds_pair.png" in _links(ROOT / "README.md")  # the front page's figure


def _config_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            keys += _config_keys(factory, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            keys.append(prefix + f.name)
    return keys


def test_the_configuration_reference_is_up_to_date():
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == config_reference.render(), (
        "docs/configuration.md is out of date: python -m glassmetric.config_reference -o docs/configuration.md"
    )
    assert config_reference.main(["--check", str(ROOT / "docs" / "configuration.md")]) == 0


def test_the_configuration_reference_lists_and_explains_every_key():
    cells = [
        [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        for line in (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("| `")
    ]
    assert all(len(row) == 4 for row in cells)  # key, type, default, meaning
    rows = {key.strip("`"): meaning for key, _, _, meaning in cells}
    keys = _config_keys()
    assert len(keys) > 80 and sorted(rows) == sorted(keys)
    assert all(len(rows[k]) > 8 for k in keys), [k for k in keys if len(rows[k]) <= 8]
    defaults = {key.strip("`"): default.strip("`") for key, _, default, _ in cells}
    assert defaults["trainer.max_epochs"] == str(Config().trainer.max_epochs)
    assert defaults["structural.tol"] == "0.0001" and defaults["data.root"] == "null"


def test_the_reference_check_fails_on_a_stale_file(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text(config_reference.render().replace("| `seed` |", "| `seeds` |"))
    assert config_reference.main(["--check", str(stale)]) == 1
