"""The option reference, docs/configuration.md, generated from the config dataclasses.

Each key's type and default come from :class:`glassmetric.config.Config`, its help from the
``#:`` comment above its declaration (or :data:`glassmetric.config_help.HELP`), its accepted
range from the checks ``load_config`` applies::

    python -m glassmetric.config_reference -o docs/configuration.md
    python -m glassmetric.config_reference --check docs/configuration.md   # exit 1 if out of date
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glassmetric import config as config_module
from glassmetric.config_help import HELP


@dataclass(frozen=True)
class Option:
    """One config key as the reference lists it."""

    key: str
    type: str
    default: str
    help: str
    accepted: str


def _comments_above_fields(cls: type) -> dict[str, str]:
    """field name -> the ``#:`` comment lines right above its declaration, joined."""
    source = inspect.getsource(config_module)
    lines = source.splitlines()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    comments: dict[str, str] = {}
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            above: list[str] = []
            i = item.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#:"):
                above.insert(0, lines[i].strip()[2:].strip())
                i -= 1
            comments[item.target.id] = " ".join(above)
    return comments


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)


def _sections(cls: type = config_module.Config, prefix: str = "") -> list[tuple[str, str, list[Option]]]:
    """(section key, section docstring, its options) for ``cls`` and every nested dataclass."""
    ranges = {key: what for key, _, what in config_module._RANGES}
    comments = _comments_above_fields(cls)
    own: list[Option] = []
    nested: list[tuple[str, str, list[Option]]] = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            nested += _sections(factory, key + ".")
            continue
        default = f.default if factory is dataclasses.MISSING else factory()
        help_text = comments.get(f.name) or HELP.get(key, "")
        own.append(Option(key, str(f.type), _yaml_value(default), help_text, ranges.get(key, "")))
    doc = inspect.getdoc(cls) or ""
    if cls is config_module.Config or doc.startswith(cls.__name__ + "("):  # dataclasses' generated signature
        doc = ""
    return [(prefix.rstrip("."), doc, own), *nested]


def options() -> list[Option]:
    """Every config key, in declaration order."""
    return [option for _, _, section in _sections() for option in section]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """The Markdown of docs/configuration.md."""
    out = [
        "# Configuration reference",
        "",
        "Every key of a glassmetric config, with its type, default and meaning. A preset (`glassmetric",
        "presets`) or a YAML file sets some of them; `key.sub=value` on the command line overrides any",
        "(`glassmetric fit --config demo trainer.max_epochs=2`); an unknown key or a value outside its",
        "accepted range fails at once with one line naming it. The defaults below are the dataclasses';",
        "a preset changes many of them.",
        "",
        "Generated from `src/glassmetric/config.py` by `python -m glassmetric.config_reference -o",
        "docs/configuration.md`; `tests/test_docs.py` checks that this file is up to date.",
    ]
    for section, doc, section_options in _sections():
        if not section_options:
            continue
        out += ["", f"## `{section}`" if section else "## Top level", ""]
        if doc:
            out += [" ".join(doc.split()).replace("``", "`").replace(":mod:", ""), ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for o in section_options:
            meaning = o.help + (f" (accepted: {o.accepted})" if o.accepted else "")
            meaning = meaning.replace("``", "`")
            out.append(f"| `{o.key}` | `{_cell(o.type)}` | `{_cell(o.default)}` | {_cell(meaning)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glassmetric.config_reference", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-o", "--out", type=Path, help="write the reference here (default: standard output)")
    group.add_argument("--check", type=Path, metavar="FILE", help="exit 1 when FILE differs from the reference")
    args = parser.parse_args(argv)
    text = render()
    if args.check is not None:
        if not args.check.is_file() or args.check.read_text(encoding="utf-8") != text:
            print(
                f"{args.check} is out of date: run python -m glassmetric.config_reference -o {args.check}",
                file=sys.stderr,
            )
            return 1
        return 0
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
