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


def _pyproject_version() -> str:
    from pathlib import Path

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"$', text, re.MULTILINE)[1]


def test_version_is_the_packages_and_python_m_glassmetric_runs_the_cli():
    import subprocess
    import sys

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert out.getvalue() == f"glassmetric {_pyproject_version()}\n"
    proc = subprocess.run([sys.executable, "-m", "glassmetric", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == out.getvalue(), proc.stderr
    proc = subprocess.run([sys.executable, "-m", "glassmetric", "eval"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("glassmetric eval: error:"), proc.stderr


@pytest.mark.parametrize("verb", ["eval", "fit", "export", "presets"])
def test_an_unknown_flag_points_at_the_verbs_help(verb):
    argv = [verb, "--checkpoint", "x.ckpt", "--bogus"] if verb in ("eval", "export") else [verb, "--bogus"]
    code, err = _run(argv)
    assert code == 2
    assert err == f"glassmetric {verb}: error: unrecognized arguments: --bogus (see glassmetric {verb} --help)\n"


def test_verbose_is_taken_before_and_after_the_verb():
    assert cli._parse(["-v", "presets"]).verbose and cli._parse(["presets", "--verbose"]).verbose
    assert not cli._parse(["presets"]).verbose


@pytest.mark.parametrize(
    ("override", "key", "suggestion"),
    [
        ("trainer.max_epoch=3", "trainer.max_epoch", "did you mean trainer.max_epochs?"),
        ("trainr.max_epochs=3", "trainr", "did you mean trainer?"),
        ("model.embeding_dim=8", "model.embeding_dim", "did you mean model.embedding_dim?"),
        ("data.zzzzzz=1", "data.zzzzzz", None),
    ],
)
def test_a_mistyped_config_key_gets_the_nearest_known_key(no_training, override, key, suggestion):
    code, err = _run(["fit", override])
    assert code == 2 and err.startswith(f"glassmetric fit: error: unknown config key {key} ("), err
    assert (suggestion in err) if suggestion else ("did you mean" not in err), err


def _image_bytes(fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "what"),
    [
        ("photo.png", lambda: _image_bytes("PNG"), "a PNG image"),
        ("photo.jpg", lambda: _image_bytes("JPEG"), "a JPEG image"),
        ("photo.gif", lambda: _image_bytes("GIF"), "a GIF image"),
    ],
)
def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path, name, content, what):
    path = tmp_path / name
    path.write_bytes(content())
    for verb in (["eval"], ["export", "--format", "weights", "-o", str(tmp_path / "w.safetensors")]):
        code, err = _run([*verb, "--checkpoint", str(path)])
        assert (
            err == f"glassmetric {verb[0]}: error: cannot load checkpoint {path}: not a PyTorch checkpoint ({what})\n"
        )
        assert code == 2


def test_index_dir_says_when_it_builds_saves_and_reads_the_index(make_checkpoint, tmp_path, capsys):
    pytest.importorskip("faiss")
    ckpt, folder = make_checkpoint(), tmp_path / "index"
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--index-dir", str(folder)]) == 0
    first = capsys.readouterr()
    assert "gallery index: building it (exact, 16 images) ..." in first.err
    assert f"gallery index: saved to {folder} (read from there next time)" in first.err
    assert "gallery index" not in first.out
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--index-dir", str(folder)]) == 0
    second = capsys.readouterr()
    assert f"gallery index: read it from {folder} (exact, 16 images)" in second.err
    assert "building" not in second.err


@pytest.mark.parametrize("verbose", [False, True])
def test_the_k_means_size_warning_shows_only_with_verbose(make_checkpoint, capfd, verbose):
    """16 test images in 4 classes are fewer points than faiss advises for 4 centroids: faiss'
    own line never reaches stderr (fd 2); glassmetric's warning is raised with --verbose only."""
    import warnings

    from glassmetric.retrieval.metrics import KMeansSizeWarning

    pytest.importorskip("faiss")
    ckpt = make_checkpoint()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["eval", "--checkpoint", str(ckpt), *(["--verbose"] if verbose else [])]) == 0
    assert "WARNING clustering" not in capfd.readouterr().err
    sizes = [str(w.message) for w in caught if issubclass(w.category, KMeansSizeWarning)]
    assert sizes == (
        ["NMI: k-means clustering 16 points to 4 centroids (faiss advises at least 156 points)"] if verbose else []
    )
