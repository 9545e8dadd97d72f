"""The names a config accepts are exactly the names of the registries that build them, and an
unknown name is a one-line ConfigError that lists the choices."""

import inspect
import typing

import pytest

from glassmetric.config import DataConfig, LossConfig, ModelConfig, load_config
from glassmetric.data.registry import DATASETS, build_base_splits
from glassmetric.errors import ConfigError
from glassmetric.losses.metric_losses import LOSSES
from glassmetric.models.backbone import Backbone
from glassmetric.models.backbones import BACKBONES, build_backbone
from glassmetric.models.global_head import HEAD_INITS, POOLINGS


def literal_names(cls: type, key: str) -> tuple:
    """The values the config's ``Literal`` annotation of ``cls.key`` allows, in order."""
    return typing.get_args(typing.get_type_hints(cls)[key])


@pytest.mark.parametrize(
    "cls, key, registry",
    [
        (DataConfig, "name", DATASETS),
        (LossConfig, "name", LOSSES),
        (ModelConfig, "pooling", POOLINGS),
        (ModelConfig, "head_init", HEAD_INITS),
    ],
    ids=["data.name", "loss.name", "model.pooling", "model.head_init"],
)
def test_config_names_are_the_registry_names(cls, key, registry):
    assert literal_names(cls, key) == tuple(registry)


@pytest.mark.parametrize("key, registry", [("data.name", DATASETS), ("loss.name", LOSSES)])
def test_an_unknown_name_is_one_line_listing_the_choices(key, registry):
    with pytest.raises(ConfigError) as info:
        load_config("demo", [f"{key}=no_such_thing"])
    message = str(info.value)
    assert "\n" not in message and message.startswith(key) and "no_such_thing" in message
    assert all(repr(name) in message for name in registry)


def test_an_unknown_backbone_is_one_line_listing_every_registered_name():
    with pytest.raises(ConfigError) as info:
        build_backbone("vgg16")
    message = str(info.value)
    assert "\n" not in message and "'vgg16'" in message and "timm:<model_name>" in message
    assert all(name in message for name in BACKBONES)


def test_the_model_config_documents_every_registered_backbone():
    comment = inspect.getsource(ModelConfig).split("backbone: str")[0]
    assert all(name in comment for name in BACKBONES)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_registered_backbone_builds(name):
    backbone = build_backbone(name, pretrained=False)
    assert isinstance(backbone, Backbone) and backbone.name.endswith(name) and backbone.out_channels > 0


def test_the_torchvision_prefix_reaches_only_torchvision_backbones():
    assert build_backbone("torchvision:resnet18").name == "torchvision:resnet18"
    with pytest.raises(ConfigError, match="unknown backbone 'torchvision:efficientnet_lite0'"):
        build_backbone("torchvision:efficientnet_lite0")


def test_the_data_set_registry_builds_the_configured_data_set():
    cfg = load_config("demo", ["data.synthetic.num_classes=8", "data.synthetic.images_per_class=2"]).data
    train, test = build_base_splits(cfg, None, None)
    assert len(train) == len(test) == 4 * 2  # 8 classes: half train, half test
    assert set(train.labels.tolist()).isdisjoint(test.labels.tolist())
    cfg.name = "imagenet"  # past the config's checks: the registry refuses it too
    with pytest.raises(ConfigError, match=r"data.name: unknown data set 'imagenet' \(known: synthetic, cub200"):
        build_base_splits(cfg, None, None)
