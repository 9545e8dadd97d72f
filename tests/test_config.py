"""Config loading: presets, overrides, and a one-line error naming the key for every bad input."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from glassmetric.config import Config, load_config, preset_names, save_config
from glassmetric.errors import ConfigError


def test_presets_load_and_match_the_papers():
    assert {"demo", "roth2020", "proxyanchor"} <= set(preset_names())
    roth = load_config("roth2020")
    assert (roth.model.backbone, roth.model.embedding_dim, roth.model.frozen_bn) == ("resnet50", 128, True)
    assert (roth.trainer.batch_size, roth.trainer.samples_per_class) == (112, 2)
    assert (roth.optim.name, roth.optim.lr, roth.optim.weight_decay) == ("adam", 1e-5, 4e-4)
    assert roth.data.image_size == 224
    pa = load_config("proxyanchor")
    assert (pa.model.embedding_dim, pa.optim.name, pa.loss.name) == (512, "adamw", "proxyanchor")
    demo = load_config("demo")
    assert demo.data.name == "synthetic" and demo.trainer.select == "val"
    idml = load_config("idml")
    assert (idml.model.backbone, idml.model.embedding_dim, idml.model.uncertainty_dim, idml.model.pooling) == (
        "resnet50",
        512,
        512,
        "avgmax",
    )
    assert (idml.loss.name, idml.loss.similarity, idml.loss.mixup) == ("proxyanchor", "introspective", False)
    assert (idml.optim.name, idml.optim.warmup_epochs, idml.trainer.gradient_clip_val) == ("adamw", 1, 10.0)
    cross = load_config("cross_domain")
    assert (cross.data.synthetic.style, cross.data.synthetic.gallery_style) == ("photo", "painting")
    dgml = load_config("dgml")
    assert (dgml.model.backbone, dgml.model.groups, dgml.model.embedding_dim, dgml.loss.name) == (
        "resnet50",
        3,
        510,
        "margin",
    )
    assert (dgml.trainer.batch_size, dgml.trainer.samples_per_class, dgml.loss.diversity_weight) == (112, 2, 0.02)
    assert (dgml.optim.lr, dgml.optim.grouping_lr, dgml.optim.query_lr) == (1e-5, None, None)
    assert (dgml.optim.weight_decay, dgml.optim.grouping_weight_decay, dgml.optim.query_weight_decay) == (
        3e-3,
        3e-3,
        1e-3,
    )


def test_every_preset_loads():
    for name in preset_names():
        load_config(name)


def test_overrides_are_parsed_as_yaml_and_typed():
    cfg = load_config(
        "demo", ["trainer.max_epochs=3", "optim.lr=0.01", "data.train_classes=[1, 25]", "loss.params={base: 0.3}"]
    )
    assert cfg.trainer.max_epochs == 3
    assert cfg.optim.lr == 0.01
    assert cfg.data.train_classes == (1, 25)
    assert cfg.loss.params == {"base": 0.3}


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"trainer\.max_epochs"):
        load_config(None, ["trainer.max_epochs=2.5"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.max_epoch=3", "trainer.max_epoch"),
        ("bogus=1", "bogus"),
        ("model.backbone.depth=3", "model.backbone"),
        ("trainer.max_epochs=-3", "trainer.max_epochs"),
        ("trainer.batch_size=113", "trainer.batch_size"),
        ("loss.name=arcface", "loss.name"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("data.train_classes=[5, 1]", "data.train_classes"),
        ("data.train_classes=[1, 2, 3]", "data.train_classes"),
        ("model.frozen_bn=maybe", "model.frozen_bn"),
        ("trainer.select=test", "trainer.select"),
        ("data.val_classes=0", "trainer.select"),
        ("data.name=cub200", "data.root"),
        ("novalue", "novalue"),
    ],
)
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert key in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml") as e:
        load_config(str(bad))
    assert "\n" not in str(e.value) and "line 2, column 1" in str(e.value)  # where the list stops short
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(scalar))
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no-such-preset")


def test_save_and_reload_round_trip(tmp_path: Path):
    cfg = load_config("demo", ["data.train_classes=[1, 25]"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(str(tmp_path / "c.yaml"))
    assert again == cfg
    assert isinstance(yaml.safe_load((tmp_path / "c.yaml").read_text()), dict)


@pytest.mark.parametrize("section", ["loss.params", "loss.miner_params"])
def test_parameter_names_that_are_not_identifiers_are_named_on_one_line(section):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [section + '={"\\n": 0}'])
    assert str(e.value).startswith(section + ".'\\n': not a parameter of") and "\n" not in str(e.value)


def test_save_config_is_atomic(tmp_path: Path, monkeypatch):
    """A write cut short (here: the rename fails) leaves the previous config.yaml whole, and no
    temporary file behind."""
    path = tmp_path / "config.yaml"
    save_config(load_config("demo"), path)
    before = path.read_bytes()

    def cut(*_args):
        raise OSError("disk full")

    monkeypatch.setattr("glassmetric.outputs.os.replace", cut)
    with pytest.raises(OSError, match="disk full"):
        save_config(load_config("demo", ["seed=7"]), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def _leaf_keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_keys(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


_KEYS = sorted(_leaf_keys(Config()))
#: keys named by cross-field checks, which a bad value elsewhere can trigger
_CROSS_FIELD = ("trainer.batch_size", "trainer.select", "data.root")
_JUNK = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.booleans(),
    st.none(),
    st.lists(st.integers(-5, 5), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(_KEYS), value=_JUNK)
def test_random_values_either_load_or_fail_naming_the_key(key, value):
    try:
        load_config(
            "demo", [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
        )
    except ConfigError as e:
        assert key in str(e) or any(k in str(e) for k in _CROSS_FIELD)
        assert "\n" not in str(e)


@settings(max_examples=100, deadline=None)
@given(
    section=st.sampled_from(["", "data.", "model.", "loss.", "optim.", "trainer.", "eval."]),
    name=st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
)
def test_unknown_keys_are_named(section, name):
    key = section + name
    try:
        load_config("demo", [f"{key}=1"])
    except ConfigError as e:
        assert key in str(e) or section.rstrip(".") in str(e)


def test_exponent_floats_without_a_dot_are_floats(tmp_path: Path):
    assert load_config("demo", ["optim.lr=1e-3"]).optim.lr == 1e-3
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 5e-5\n")
    assert load_config(str(f)).optim.lr == 5e-5
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config("demo", ["optim.lr=fast"])


def test_auto_marginals_follow_the_spatial_head():
    """``structural.marginals: auto`` (the default) becomes cross_correlation with the shared
    head (the cells are in the global embedding's space) and pooled_cross_correlation with an
    own head (they are not, e.g. beside the groups); an explicit choice is kept."""
    assert load_config("demo").structural.marginals == "cross_correlation"
    assert load_config("demo", ["model.spatial_grid=4"]).structural.marginals == "cross_correlation"
    own = ["model.groups=4", "model.spatial_grid=4", "model.spatial_head=own", "loss.similarity=structural"]
    assert load_config("demo", own).structural.marginals == "pooled_cross_correlation"
    assert (
        load_config("demo", [*own, "structural.marginals=cross_correlation"]).structural.marginals
        == "cross_correlation"
    )
    with pytest.raises(ConfigError, match=r"structural\.marginals"):
        load_config("demo", ["structural.marginals=pooled"])


def _alias_bomb(levels: int = 9) -> str:
    """'Billion laughs': each list holds 9 aliases of the one before, 9**levels strings in all."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "{" + ", ".join(lines) + "}"


def test_yaml_aliases_are_refused_in_files_and_overrides(tmp_path: Path):
    """An alias bomb under the free-form loss.params is refused where it is read (its first
    copy, in save_config, would expand it); aliases are refused anywhere in a config."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("loss:\n  name: contrastive\n  params: " + _alias_bomb() + "\n")
    with pytest.raises(ConfigError, match=r"bomb.yaml .*line 3, column \d+: YAML aliases") as e:
        load_config(str(bomb))
    assert "\n" not in str(e.value)
    small = tmp_path / "small.yaml"
    small.write_text("optim:\n  lr: &lr 0.1\n  head_lr: *lr\n")
    with pytest.raises(ConfigError, match=r"small.yaml .*line 3, column 12: YAML aliases"):
        load_config(str(small))
    with pytest.raises(ConfigError, match=r"override loss.params: .*YAML aliases"):
        load_config("demo", ["loss.params=" + _alias_bomb(3)])


def test_deep_nesting_and_non_utf8_files_are_one_line_errors(tmp_path: Path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("loss:\n  params:\n    x: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(
        ConfigError, match=r"deep.yaml is not valid YAML: line 3, column \d+: nested more than 32 levels"
    ):
        load_config(str(deep))
    with pytest.raises(ConfigError, match=r"override loss\.params: .*nested more than 32 levels"):
        load_config("demo", ["loss.params=" + "[" * 5000 + "]" * 5000])
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("seed: 1\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text: byte 0xe9 at line 2, column 6"):
        load_config(str(latin1))
    control = tmp_path / "control.yaml"
    control.write_bytes(b"seed: 1\nx: \x01\n")
    with pytest.raises(ConfigError, match=r"control.yaml is not valid YAML: line 2, column 4: character 0x0001"):
        load_config(str(control))


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_an_endless_config_file_is_refused_without_reading_it_all():
    """``--config /dev/zero``: refused after 1 MiB, in a process whose memory is capped (256 MiB
    more than it starts with) and whose time is bounded."""
    code = (
        "import resource, sys\n"
        "from glassmetric.config import load_config\n"
        "from glassmetric.errors import ConfigError\n"
        "used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (used + (256 << 20),) * 2)\n"
        "try:\n"
        "    load_config('/dev/zero')\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "config file /dev/zero is larger than 1 MiB: not a config"


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.params.alpha=abc", "loss.params.alpha: expected a finite number, got 'abc'"),
        ("loss.params.alpha=.inf", "loss.params.alpha: expected a finite number"),
        ("loss.miner_params.epsilon=abc", "loss.miner_params.epsilon: expected a finite number, got 'abc'"),
        ("loss.params.bogus=1", "loss.params.bogus: not a parameter of pytorch-metric-learning's MultiSimilarityLoss"),
        ("loss.params.reducer=mean", "loss.params.reducer: takes a Python object"),
        ("loss.params.num_classes=3", "loss.params.num_classes: set by glassmetric"),
        ("loss.params.collect_stats=3", "loss.params.collect_stats: expected true or false"),
        ("trainer.devices=abc", "trainer.devices: expected a number of devices >= 1, 'auto', or GPU indices"),
        ("trainer.devices=0", "trainer.devices: expected"),
        ("trainer.devices=-1", "trainer.devices: expected"),
        ("trainer.devices=[]", "trainer.devices: expected"),
        ("trainer.devices=[0, 0]", "trainer.devices: expected"),
        ("trainer.devices=0,a", "trainer.devices: expected"),
        (
            "trainer.accelerator=tpu",
            "trainer.accelerator: expected one of 'auto', 'cpu', 'gpu', 'cuda', 'mps', got 'tpu'",
        ),
        ("trainer.accelerator=banana", "trainer.accelerator: expected one of"),
        ("seed=4294967296", "seed: expected between 0 and 2**32 - 1"),
        ("model.embedding_dim=1000000000", "model.embedding_dim: expected between 1 and 65536"),
    ],
)
def test_values_that_would_fail_at_run_time_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_loss_params_are_checked_against_the_loss_and_miner_classes():
    """Names and kinds come from pytorch-metric-learning's classes: the margin loss takes
    learn_beta (a bool) and nu (a number), its distance-weighted miner a cutoff."""
    from pytorch_metric_learning.losses import MarginLoss, MultiSimilarityLoss
    from pytorch_metric_learning.miners import DistanceWeightedMiner

    margin = [
        "loss.name=margin",
        "loss.params={nu: 0.1, learn_beta: false, margin: 1e-1}",
        "loss.miner_params.cutoff=0.4",
    ]
    cfg = load_config("demo", margin)
    assert cfg.loss.params == {"nu": 0.1, "learn_beta": False, "margin": 0.1} and cfg.loss.miner_params == {
        "cutoff": 0.4
    }
    MarginLoss(num_classes=4, **cfg.loss.params)  # what the config accepts, the classes take
    DistanceWeightedMiner(**cfg.loss.miner_params)
    ms = load_config("demo", ["loss.params={alpha: 1e-3, base: 1, collect_stats: true}"]).loss.params
    assert ms == {"alpha": 1e-3, "base": 1, "collect_stats": True}
    MultiSimilarityLoss(**ms)
    with pytest.raises(ConfigError, match=r"loss\.params\.learn_beta: expected true or false, got 'maybe'"):
        load_config("demo", ["loss.name=margin", "loss.params.learn_beta=maybe"])
    with pytest.raises(ConfigError, match=r"loss\.miner_params: loss 'proxyanchor' uses no miner"):
        load_config("demo", ["loss.name=proxyanchor", "loss.miner_params.epsilon=0.1"])


def test_devices_and_seeds_at_the_edges_of_their_ranges():
    """Lightning's forms of ``devices``: a count, "auto", GPU indices as "0,1" (one index as
    "0,": "0" alone would be a count of none); numpy seeds span 0 .. 2**32 - 1."""

    def devices(v):
        return load_config("demo", [f"trainer.devices={v}"]).trainer.devices

    assert [devices(v) for v in ("2", "auto", "[0, 1]", "[2]", "0,1", "0,")] == [2, "auto", "0,1", "2,", "0,1", "0,"]
    import numpy as np

    seed = load_config("demo", [f"seed={2**32 - 1}"]).seed
    np.random.seed(seed)  # the largest accepted seed is one numpy takes ...
    with pytest.raises(ValueError):
        np.random.seed(seed + 1)  # ... and the next is not
    assert load_config("demo", ["model.embedding_dim=65536"]).model.embedding_dim == 65536


def test_extra_train_entries_load_round_trip_and_name_the_entry_in_errors(tmp_path: Path):
    cfg = load_config(
        "demo", ["data.extra_train=[{root: /data/birds}, {root: /data/cub, kind: cub200, classes: [3, 9]}]"]
    )
    first, second = cfg.data.extra_train
    assert (first.root, first.kind, first.classes, first.merge_names) == ("/data/birds", "auto", None, False)
    assert (second.root, second.kind, second.classes) == ("/data/cub", "cub200", (3, 9))
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")).data.extra_train == cfg.data.extra_train
    for override, message in [
        ("data.extra_train=/data/birds", "data.extra_train: expected a list of mappings with the keys root, kind"),
        (
            "data.extra_train=[{root: /a}, {kind: folder}]",
            "data.extra_train[1].root: every extra training set needs a root",
        ),
        ("data.extra_train=[{root: /a, colour: red}]", "unknown config key data.extra_train[0].colour"),
        ("data.extra_train=[{root: /a, kind: zip}]", "data.extra_train[0].kind: expected one of 'auto', 'folder'"),
        (
            "data.extra_train=[{root: /a, classes: [1, 5]}]",
            "data.extra_train[0].classes: a class-id range needs kind cub200 or cars196",
        ),
        (
            "data.extra_train=[{root: /a, kind: cars196, classes: [5, 1]}]",
            "data.extra_train[0].classes: expected a range",
        ),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config("demo", [override])
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
