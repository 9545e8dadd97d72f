import pytest

from glassmetric.config import load_config
from glassmetric.similarity.ot_settings import OTSettings


def test_from_config_reads_every_structural_key():
    cfg = load_config(
        "demo_scratch",
        [
            "structural.epsilon=0.1",
            "structural.iters=7",
            "structural.tol=null",
            "structural.marginals=uniform",
            "structural.gradient=unrolled",
        ],
    )
    assert OTSettings.from_config(cfg) == OTSettings(
        epsilon=0.1, iters=7, tol=None, marginals="uniform", gradient="unrolled"
    )
    assert OTSettings.from_config(cfg.structural) == OTSettings.from_config(cfg)


def test_the_config_default_is_the_settings_default():
    cfg = load_config("demo_scratch", ["structural.marginals=cross_correlation"])
    assert OTSettings.from_config(cfg) == OTSettings()
    assert OTSettings().tol == 1e-4


@pytest.mark.parametrize(
    "bad",
    [
        {"epsilon": 0},
        {"iters": 0},
        {"iters": 2.5},
        {"tol": 0},
        {"tol": -1e-3},
        {"marginals": "auto"},
        {"gradient": "through"},
    ],
)
def test_bad_settings_are_named(bad):
    (name,) = bad
    with pytest.raises(ValueError, match=f"OTSettings.{name}"):
        OTSettings(**bad)
