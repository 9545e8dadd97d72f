"""Backbones: shapes, frozen BatchNorm, weight loading (all offline)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from glassmetric.errors import ConfigError, WeightsError
from glassmetric.models import IMAGENET_MEAN, IMAGENET_STD, Backbone, backbones, build_backbone

IMAGES = torch.randn(2, 3, 64, 64)


@pytest.fixture(scope="module")
def resnet18() -> Backbone:
    return build_backbone("resnet18")


# ---------------------------------------------------------------------- shapes
def test_resnet18_shape_and_attributes(resnet18: Backbone) -> None:
    fmap = resnet18(IMAGES)
    assert fmap.shape == (2, 512, 2, 2)
    assert resnet18.out_channels == 512
    assert resnet18.stride == 32
    assert resnet18.name == "torchvision:resnet18"
    assert resnet18.mean == IMAGENET_MEAN and resnet18.std == IMAGENET_STD
    assert not any(k.startswith(("fc.", "avgpool")) for k in resnet18.trunk.state_dict())


def test_resnet50_shape() -> None:
    backbone = build_backbone("torchvision:resnet50")
    assert backbone.out_channels == 2048
    assert backbone(IMAGES[:1]).shape == (1, 2048, 2, 2)


@pytest.mark.parametrize("name", ["timm:resnet10t", "timm:mobilenetv3_small_050"])
def test_timm_cnn_shape(name: str) -> None:
    backbone = build_backbone(name)
    fmap = backbone(IMAGES)
    assert fmap.dim() == 4 and fmap.shape[0] == 2
    assert fmap.shape[1] == backbone.out_channels
    assert fmap.shape[2:] == (64 // backbone.stride, 64 // backbone.stride)


def test_timm_vit_tokens_become_grid() -> None:
    backbone = build_backbone("timm:vit_tiny_patch16_224", timm_kwargs={"img_size": 64})
    assert backbone.stride == 16 and backbone.out_channels == 192
    backbone.eval()
    with torch.no_grad():
        fmap = backbone(IMAGES)
        tokens = backbone.trunk.forward_features(IMAGES)
    assert fmap.shape == (2, 192, 4, 4)
    prefix = backbone.trunk.num_prefix_tokens
    assert tokens.shape[1] == prefix + 16
    for i in range(4):
        for j in range(4):
            torch.testing.assert_close(fmap[:, :, i, j], tokens[:, prefix + 4 * i + j])
    assert backbone.mean == (0.5, 0.5, 0.5)  # the timm pretrained config's normalisation


# ---------------------------------------------------------------------- errors on names
@pytest.mark.parametrize(
    "name", ["resnet5000", "vgg16", "torchvision:vit_b_16", "timm:no_such_model", "foo:resnet18", ""]
)
def test_unknown_backbone(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_backbone(name)
    message = str(info.value)
    assert repr(name) in message or "non-empty" in message
    if name:
        assert "resnet50" in message or "timm" in message


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"resnet18.*resnet101.*timm:<model_name>"):
        build_backbone("vgg16")


def test_timm_kwargs_rejected_for_torchvision() -> None:
    with pytest.raises(ConfigError, match="timm_kwargs"):
        build_backbone("resnet18", timm_kwargs={"img_size": 64})


# ---------------------------------------------------------------------- frozen BN
def _bn_state(backbone: Backbone) -> list[torch.Tensor]:
    return [t.clone() for bn in backbone.batchnorm_layers() for t in (bn.running_mean, bn.running_var)]


def test_frozen_bn_keeps_stats_and_blocks_grad() -> None:
    backbone = build_backbone("resnet18", frozen_bn=True)
    backbone.train()
    bns = list(backbone.batchnorm_layers())
    assert bns and all(not bn.training for bn in bns)
    assert backbone.trunk.layer1.training  # everything else is in train mode
    before = _bn_state(backbone)
    backbone(IMAGES).square().mean().backward()
    for old, new in zip(before, _bn_state(backbone), strict=True):
        torch.testing.assert_close(old, new, rtol=0, atol=0)
    for bn in bns:
        for p in bn.parameters():
            assert not p.requires_grad and p.grad is None
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in convs)


def test_frozen_bn_survives_parent_train() -> None:
    backbone = build_backbone("timm:resnet10t", frozen_bn=True)
    parent = nn.Sequential(backbone)
    parent.eval()
    parent.train()
    assert all(not bn.training for bn in backbone.batchnorm_layers())


def test_unfrozen_bn_updates_stats() -> None:
    backbone = build_backbone("resnet18").train()
    before = _bn_state(backbone)
    with torch.no_grad():
        backbone(IMAGES)
    assert any(not torch.equal(a, b) for a, b in zip(before, _bn_state(backbone), strict=True))
    assert all(p.requires_grad for p in backbone.parameters())


# ---------------------------------------------------------------------- local weight files
def test_load_local_file_round_trip(tmp_path, resnet18: Backbone) -> None:
    state = dict(resnet18.trunk.state_dict())
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    loaded = build_backbone("resnet18", pretrained=str(path))
    for key, value in resnet18.trunk.state_dict().items():
        torch.testing.assert_close(loaded.trunk.state_dict()[key], value, rtol=0, atol=0)


def test_load_saved_backbone_state_dict(tmp_path, resnet18: Backbone) -> None:
    path = tmp_path / "backbone.pt"
    torch.save({"state_dict": resnet18.state_dict()}, path)  # "trunk." prefix, wrapped
    loaded = build_backbone("resnet18", pretrained=path)
    torch.testing.assert_close(loaded.trunk.conv1.weight, resnet18.trunk.conv1.weight, rtol=0, atol=0)


def test_load_safetensors(tmp_path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    source = build_backbone("timm:mobilenetv3_small_050")
    path = tmp_path / "w.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in source.trunk.state_dict().items()}, str(path))
    loaded = build_backbone("timm:mobilenetv3_small_050", pretrained=str(path))
    for key, value in source.trunk.state_dict().items():
        torch.testing.assert_close(loaded.trunk.state_dict()[key], value, rtol=0, atol=0)


def test_wrong_keys_raise(tmp_path, resnet18: Backbone) -> None:
    state = dict(resnet18.trunk.state_dict())
    state.pop("conv1.weight")
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad_keys.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"bad_keys\.pth") as info:
        build_backbone("resnet18", pretrained=str(path))
    assert "conv1.weight" in str(info.value) and "extra.weight" in str(info.value)


def test_wrong_shapes_raise(tmp_path) -> None:
    path = tmp_path / "r34.pth"
    torch.save(build_backbone("timm:resnet10t").trunk.state_dict(), path)
    with pytest.raises(WeightsError, match=r"r34\.pth"):
        build_backbone("resnet18", pretrained=str(path))


def test_missing_file_raises(tmp_path) -> None:
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsError, match=r"nowhere\.pth"):
        build_backbone("resnet18", pretrained=str(missing))


def test_unreadable_file_raises(tmp_path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"garbage\.pth"):
        build_backbone("resnet18", pretrained=str(path))


# ---------------------------------------------------------------------- pretrained=True offline
def _no_download(*args, **kwargs):
    raise OSError("network disabled in tests")


def test_pretrained_true_without_cache_raises_quickly(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    start = time.monotonic()
    with pytest.raises(WeightsError) as info:
        build_backbone("resnet18", pretrained=True)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "resnet18" in message and "pretrained: /path/to/weights.pth" in message
    assert "pretrained: false" in message


def test_pretrained_true_reads_hub_cache(tmp_path, monkeypatch, resnet18: Backbone) -> None:
    import torchvision

    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    state = dict(resnet18.trunk.state_dict(), **{"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    torch.save(state, checkpoints / url.rsplit("/", 1)[-1])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    loaded = build_backbone("resnet18", pretrained=True)
    torch.testing.assert_close(
        loaded.trunk.layer4[1].conv2.weight, resnet18.trunk.layer4[1].conv2.weight, rtol=0, atol=0
    )


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_timm_pretrained_unreachable_raises_quickly(empty_hf_cache, monkeypatch) -> None:
    monkeypatch.setattr(backbones, "_reachable", lambda host, **kw: False)
    start = time.monotonic()
    with pytest.raises(WeightsError, match=r"timm:resnet10t.*huggingface\.co.*pretrained: false"):
        build_backbone("timm:resnet10t", pretrained=True)
    assert time.monotonic() - start < 10


def test_timm_pretrained_download_failure_becomes_weights_error(empty_hf_cache, monkeypatch) -> None:
    import timm.models._builder as timm_builder

    monkeypatch.setattr(backbones, "_reachable", lambda host, **kw: True)
    monkeypatch.setattr(timm_builder, "load_pretrained", _no_download)
    with pytest.raises(WeightsError, match=r"timm:resnet10t.*network disabled.*pretrained: false"):
        build_backbone("timm:resnet10t", pretrained=True)


def test_timm_pretrained_reads_hf_cache_offline(empty_hf_cache, monkeypatch) -> None:
    import timm
    import timm.models._hub as timm_hub

    safetensors = pytest.importorskip("safetensors.torch")
    source = timm.create_model("resnet10t", pretrained=False)  # with its 1000-class fc
    snapshot = empty_hf_cache / "models--timm--resnet10t.c3_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    safetensors.save_file(source.state_dict(), str(snapshot / "model.safetensors"))

    def no_network(*args, **kwargs):
        raise AssertionError("the network must not be touched when weights are cached")

    monkeypatch.setattr(backbones, "_reachable", no_network)
    monkeypatch.setattr(timm_hub, "hf_hub_download", no_network)
    loaded = build_backbone("timm:resnet10t", pretrained=True)
    for key, value in loaded.trunk.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key], rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["", "  ", 3, None])
def test_bad_pretrained_value(bad) -> None:
    with pytest.raises(ConfigError, match="pretrained"):
        build_backbone("resnet18", pretrained=bad)


def test_freeze_except_trains_only_the_named_stages():
    backbone = build_backbone("resnet18")
    backbone.freeze_except(["layer4"])
    trainable = {n for n, p in backbone.trunk.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("layer4.") for n in trainable)
    assert all(p.requires_grad for n, p in backbone.trunk.named_parameters() if n.startswith("layer4."))
    backbone.train()
    frozen_bn = backbone.trunk.layer3[0].bn1
    stats = frozen_bn.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64))
    assert not frozen_bn.training and torch.equal(frozen_bn.running_mean, stats)
    assert backbone.trunk.layer4[0].bn1.training


def test_freeze_except_rejects_unknown_paths():
    backbone = build_backbone("resnet18")
    with pytest.raises(ConfigError, match="layer9") as e:
        backbone.freeze_except(["layer9"])
    assert "layer4" in str(e.value)


@pytest.mark.parametrize(
    "url", ["https://weights.example.org/models/net_a.pth", ("https://weights.example.org/dl?id=7", "net_a.pth")]
)
def test_timm_url_weights_are_found_in_timms_cache_by_their_file_name(url, tmp_path, monkeypatch):
    """timm names a url's cached file by the url's last path part, or by the second item of a
    ``(url, file name)`` pair."""
    import timm.models
    import timm.models._hub
    from timm.models import PretrainedCfg

    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: PretrainedCfg(url=url))
    monkeypatch.setattr(timm.models._hub, "get_cache_dir", lambda: str(tmp_path))
    assert backbones._timm_weights_source("net_a") == (None, "weights.example.org")
    (tmp_path / "net_a.pth").write_bytes(b"")
    assert backbones._timm_weights_source("net_a") == ({"file": str(tmp_path / "net_a.pth")}, None)
