"""Property tests of the command line: random wrong flags, values and config overrides all end
in one line on stderr (naming the argument or key) and exit status 2, never a traceback."""

import contextlib
import dataclasses
import io
import re
from types import SimpleNamespace

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glassmetric import cli
from glassmetric.config import Config

CROSS_FIELD = (
    "trainer.batch_size",
    "trainer.select",
    "data.root",
    "data.image_size",
    "loss.similarity",
    "model.groups",
    "model.spatial_head",
)


def _leaves(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        yield from _leaves(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]


KEYS = sorted(_leaves(Config()))
WORD = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=10)
JUNK = st.one_of(
    st.integers(-(10**9), 10**9),
    st.floats(),
    WORD,
    st.booleans(),
    st.none(),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text("abc", max_size=3), st.integers(), max_size=2),
)
KEY = st.one_of(
    st.sampled_from(KEYS),
    st.builds(
        lambda s, n: s + n,
        st.sampled_from(["", "data.", "trainer.", "optim.", "model."]),
        st.from_regex(r"[a-z_]{1,10}", fullmatch=True),
    ),
)


def _override(key, value) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


FLAG_VALUES = {
    "--k": st.one_of(WORD, st.just("-1,2"), st.just("0,5")),
    "--groups-fraction": st.one_of(WORD, st.floats().map(str)),
    "--groups-parts": st.one_of(WORD, st.integers(-5, 5).map(str)),
    "--correspondence": st.integers(-5, 5).map(str),
    "--knn": WORD,
    "--split": WORD,
    "--rerank": st.one_of(WORD, st.just("structural")),
    "--top-flows": st.integers(-5, 5).map(str),
}


@st.composite
def argvs(draw):
    command = draw(st.sampled_from(["fit", "eval", "explain", "presets", "nonsense"]))
    argv = [command]
    if command == "fit":
        argv += ["--config", draw(st.sampled_from(["demo", "cub50", "no-such-preset", "missing.yaml"]))]
    elif command in ("eval", "explain"):
        argv += draw(st.sampled_from([[], ["a.png", "b.png"]])) if command == "explain" else []
        argv += draw(st.sampled_from([["--checkpoint", "no/such.ckpt"], []]))
    for flag in draw(st.lists(st.sampled_from([*sorted(FLAG_VALUES), "--bogus", "--resume"]), max_size=3)):
        argv += [flag] + ([draw(FLAG_VALUES[flag])] if flag in FLAG_VALUES else [])
    argv += [_override(k, v) for k, v in draw(st.lists(st.tuples(KEY, JUNK), max_size=3))]
    return argv


def _run(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue()


@pytest.fixture
def no_training(monkeypatch):
    """A valid ``fit`` command returns at once instead of training."""
    import glassmetric.training.fit as fit_module

    monkeypatch.setattr(fit_module, "fit", lambda cfg, **kw: SimpleNamespace(test_metrics={}))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=argvs())
def test_random_command_lines_fail_on_one_line(no_training, argv):
    code, err = _run(argv)
    if code == 0:
        return
    assert code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, (argv, err)
    named = re.findall(r"[\w.-]+", lines[0])
    overrides = [a.split("=", 1)[0] for a in argv if "=" in a and not a.startswith("-")]
    culprits = (
        set(overrides)
        | {a for a in argv if a.startswith("-")}
        | set(CROSS_FIELD)
        | {"no-such-preset", "missing.yaml", "no/such.ckpt", "nonsense"}
    )
    assert any(c in lines[0] for c in culprits) or "required" in lines[0] or "unknown config key" in lines[0], (
        argv,
        err,
        named,
    )


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
TREE = st.dictionaries(
    st.one_of(st.sampled_from(sorted(SECTIONS)), st.from_regex(r"[a-z]{1,6}", fullmatch=True)),
    st.one_of(
        JUNK, st.dictionaries(st.one_of(st.sampled_from([k.split(".", 1)[-1] for k in KEYS]), WORD), JUNK, max_size=3)
    ),
    max_size=4,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=TREE)
def test_random_config_files_fail_naming_the_key(no_training, tmp_path, tree):
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    code, err = _run(["fit", "--config", str(path)])
    if code == 0:
        return
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (tree, err)
    keys = [str(k) for k in tree] + [f"{k}.{sub}" for k, v in tree.items() if isinstance(v, dict) for sub in v]
    assert any(k in err for k in keys + list(CROSS_FIELD)), (tree, err)


@pytest.mark.parametrize("size", ["100000", "8", "0", "-64"])
def test_export_image_sizes_outside_16_to_4096_are_refused_before_anything_runs(make_checkpoint, monkeypatch, size):
    """--image-size has data.image_size's range; a refused size never reaches the export
    (100,000 px would be a 240 GB input tensor)."""
    import glassmetric.export.onnx as onnx_export

    def reached(model, path, image_size, **kw):
        raise AssertionError(f"export ran at {image_size} px")

    monkeypatch.setattr(onnx_export, "export_onnx", reached)
    code, err = _run(["export", "--checkpoint", str(make_checkpoint()), "--image-size", size, "--no-check"])
    assert code == 2 and err == f"glassmetric export: error: --image-size: expected between 16 and 4096, got {size}\n"
