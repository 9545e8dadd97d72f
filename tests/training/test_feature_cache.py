"""Training on cached features of the frozen first stages (``trainer.cache_features``): the same
network as the uncached path, the same losses and gradients on the same views, exact resume,
a fingerprint that rebuilds the cache when its inputs change, and errors naming the key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from nested_close import assert_nested_close
from PIL import Image
from tiny_fit import SMALL, TINY_RUN

from glassmetric.checkpoints import safe_torch_load
from glassmetric.cli import main
from glassmetric.config import load_config
from glassmetric.data.folder import ImageFolderDataset
from glassmetric.data.transforms import build_transforms
from glassmetric.errors import ConfigError
from glassmetric.factory import build_model_from_config, make_splits
from glassmetric.models.backbone_split import split_frozen
from glassmetric.models.backbones import build_backbone
from glassmetric.training.feature_cache import CachedViews, build_features, load_or_build_cache, training_view
from glassmetric.training.fit import fit
from glassmetric.training.module import MetricLearner
from glassmetric.training.resume import SeededSamples
from glassmetric.training.run_folder import FEATURE_CACHE_FILE, clear_previous_run

#: the cub50 preset's model (EfficientNet-Lite0, the last two stages and the head conv train,
#: frozen BatchNorm) at 64 px, untrained
LITE0 = (
    "model.backbone=efficientnet_lite0",
    "model.pretrained=false",
    "model.frozen_bn=true",
    "model.trainable_backbone=[blocks.5, blocks.6, conv_head]",
)
#: timm's 0.1M-parameter EfficientNet, its last stage and head conv training
TINY_NET = (
    "model.backbone=timm:test_efficientnet",
    "model.frozen_bn=true",
    "model.trainable_backbone=[blocks.4, conv_head]",
)


def _config(*overrides: str, out: Path | None = None):
    where = [f"trainer.output_dir={out}"] if out is not None else []
    return load_config("demo_scratch", [*SMALL, *TINY_RUN, *overrides, *where])


# ---------------------------------------------------------------------- the split
@pytest.mark.parametrize(
    ("name", "trainable", "boundary"),
    [
        ("efficientnet_lite0", ["blocks.5", "blocks.6", "conv_head"], "blocks.4"),
        ("efficientnet_lite0", ["blocks.5.2", "blocks.5.3", "blocks.6", "conv_head"], "blocks.5.1"),
        ("timm:test_resnet", ["layer4"], "layer3"),
        ("resnet18", ["layer3.1", "layer4"], "layer3.0"),
    ],
)
def test_the_split_backbone_is_the_whole_backbone(name, trainable, boundary):
    torch.manual_seed(0)
    backbone = build_backbone(name, frozen_bn=True)
    backbone.freeze_except(trainable)
    backbone.train()
    split = split_frozen(backbone)
    assert split.boundary == boundary
    assert not any(p.requires_grad for _, m in split.frozen for p in m.parameters())
    assert all(any(p.requires_grad for p in m.parameters()) for _, m in split.trainable[:1])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(split.rest(split.frozen_features(images)), backbone(images), rtol=0, atol=0)


def test_nothing_frozen_or_an_unsplittable_backbone_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"^trainer\.cache_features: the first stage .* \(conv_stem\) trains"):
        split_frozen(build_backbone("efficientnet_lite0", frozen_bn=True))  # BatchNorm frozen, weights train
    vit = build_backbone("timm:test_vit")
    for p in vit.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match=r"^trainer\.cache_features: backbone 'timm:test_vit' cannot be split"):
        split_frozen(vit)


def test_the_cli_names_the_key_when_nothing_is_frozen(tmp_path, capsys):
    code = main(["fit", "--config", "demo_scratch", *SMALL, *TINY_RUN, "model.backbone=timm:test_efficientnet",
                 "trainer.cache_features=2", f"trainer.output_dir={tmp_path}"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("glassmetric fit: error: trainer.cache_features: the first stage")
    assert [p.name for p in tmp_path.iterdir()] == [".fit.lock"]  # nothing written but the run lock


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.cache_features=-1"], r"trainer\.cache_features: expected >= 0"),
        (["trainer.cache_features=2", "loss.mixup=true"], r"trainer\.cache_features: loss\.mixup mixes input images"),
    ],
)
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(*TINY_NET, *overrides)


# ---------------------------------------------------------------------- same losses and gradients
HEADS = {
    "global": [],
    "groups + uncertainty, introspective": [
        "model.groups=2",
        "model.uncertainty_dim=8",
        "loss.similarity=introspective",
    ],
    "spatial grid, structural": ["model.spatial_grid=2", "model.spatial_head=own", "loss.similarity=structural"],
}


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_losses_and_gradients_equal_the_uncached_path_on_the_same_views(heads, dtype):
    """float32 storage: the uncached path's loss and every weight's gradient, to rounding.
    float16 storage rounds the features by 2e-4 (relative); the loss moves by about 1e-5 and the
    gradient by as much as the same noise in float32 features moves it (0.3-3 % in this tiny
    untrained network, whose ReLU6 kinks and mined pairs make the gradient sensitive), a small
    fraction of what drawing the other view changes (more than 100 %)."""
    cfg = _config(*LITE0, *HEADS[heads])
    torch.manual_seed(0)
    model = build_model_from_config(cfg)
    train = make_splits(cfg, model).train
    module = MetricLearner(cfg, train.labels, model=model).train()
    split = split_frozen(model.backbone)
    seed, views = 7, 2
    features, present = build_features(split, train, views=views, seed=seed, dtype=dtype)
    assert features.dtype == dtype and present.all()
    # three images of each of four classes, each in one of its two views
    rows = np.concatenate([np.flatnonzero(train.labels == c)[:3] for c in np.unique(train.labels)[:4]])
    chosen = [(int(i), int(i) % views) for i in rows]
    images = torch.stack([training_view(train, i, v, seed) for i, v in chosen])
    labels = module.label_lookup[torch.as_tensor(train.labels[rows])]

    def step(inputs: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
        module.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss, _ = module.objective(inputs, labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        return float(loss.detach()), grads

    loss, grads = step(images)  # the uncached path: the whole network on the images
    module.feature_split = split
    cached_loss, cached_grads = step(torch.stack([features[i, v] for i, v in chosen]))
    assert grads.keys() == cached_grads.keys()
    assert any(n.startswith("model.backbone.trunk.blocks.5.") for n in grads)  # the trained stages
    assert {n.split(".")[1] for n in grads} & {"head", "extra_heads"}  # the heads
    assert not any(n.startswith("model.backbone.trunk.blocks.4.") for n in grads)  # the frozen part

    def flat(g: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([g[n].flatten() for n in grads])

    total = float(flat(grads).norm())
    if dtype == torch.float32:
        assert cached_loss == pytest.approx(loss, rel=1e-6, abs=1e-7)
        # per weight, relative to its gradient's norm, or for a gradient that is zero but for
        # rounding (the grouping keys' bias: softmax ignores a shift) to 1e-3 of the whole one's
        for name, g in grads.items():
            error = float((cached_grads[name] - g).norm()) / max(float(g.norm()), 1e-3 * total)
            assert error <= 1e-5, f"{name}: relative error {error:.2e}"
    else:
        assert cached_loss == pytest.approx(loss, rel=1e-4)
        error = float((flat(cached_grads) - flat(grads)).norm()) / total
        _, other_view = step(torch.stack([features[i, 1 - v] for i, v in chosen]))
        augmentation = float((flat(other_view) - flat(grads)).norm()) / total
        assert error <= 0.05 and error <= augmentation / 10, (error, augmentation)


# ---------------------------------------------------------------------- epochs draw seeded views
def test_each_sample_draws_one_view_from_its_seed():
    features = torch.arange(3 * 4, dtype=torch.float16).reshape(3, 4, 1)
    samples = SeededSamples(CachedViews(features, torch.tensor([True, True, False]), np.array([5, 5, 6])))
    first = [int(samples[(1, s)]["features"]) for s in range(40)]
    assert first == [int(samples[(1, s)]["features"]) for s in range(40)]  # the same seeds, the same views
    assert set(first) == {4, 5, 6, 7}  # image 1's four views, all of them drawn
    assert samples[(0, 3)]["label"] == 5 and samples[(2, 3)] is None  # unreadable images are skipped


# ---------------------------------------------------------------------- exact resume
class CrashAtStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_a_run_stopped_after_epoch_1_and_resumed_equals_the_uninterrupted_run(tmp_path, capsys):
    run = (*TINY_NET, "trainer.cache_features=3", "trainer.max_epochs=2", "optim.lr=1e-2")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    fit(_config(*run, out=straight))
    steps = safe_torch_load(straight / "checkpoints" / "last.ckpt")["global_step"]
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(_config(*run, out=stopped), callbacks=[CrashAtStep(steps // 2)])  # the first step of epoch 2
    assert safe_torch_load(stopped / "checkpoints" / "last.ckpt")["epoch"] == 0
    assert "feature cache: computing the output of blocks.3" in capsys.readouterr().out
    fit(_config(*run, out=stopped), resume=True)
    assert f"feature cache: reusing {stopped / FEATURE_CACHE_FILE}" in capsys.readouterr().out

    a, b = (safe_torch_load(p / "checkpoints" / "last.ckpt") for p in (straight, stopped))
    assert (a["global_step"], a["epoch"]) == (b["global_step"], b["epoch"]) == (steps, 1)
    for key in ("state_dict", "optimizer_states"):
        assert_nested_close(a[key], b[key], key)
    pl.seed_everything(0, verbose=False)  # the weights fit starts from
    start = build_model_from_config(_config(*run)).state_dict()
    moved = [k for k, v in start.items() if not torch.equal(v, a["state_dict"][f"model.{k}"])]
    assert any(k.startswith("backbone.trunk.blocks.4.") for k in moved) and "head.linear.weight" in moved
    assert not any(k.startswith("backbone.trunk.blocks.3.") for k in moved)  # cached: frozen
    metrics = [json.loads((p / "metrics.json").read_text())["test"] for p in (straight, stopped)]
    assert metrics[0] == pytest.approx(metrics[1], abs=1e-6)


# ---------------------------------------------------------------------- rebuilt when its inputs change
def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")
    return root


def test_the_cache_is_rebuilt_when_data_transform_weights_or_views_change_and_reused_otherwise(tmp_path):
    root = _image_folder(tmp_path / "images")
    torch.manual_seed(0)
    backbone = build_backbone("timm:test_efficientnet", frozen_bn=True)
    backbone.freeze_except(["blocks.4", "conv_head"])
    split = split_frozen(backbone)
    path = tmp_path / "run" / FEATURE_CACHE_FILE

    def cache(crop_scale=(0.35, 1.0), views=2, seed=0):
        data = ImageFolderDataset(root, transform=build_transforms(True, 32, crop_scale=crop_scale))
        return load_or_build_cache(path, split, data, views=views, seed=seed)

    first = cache()
    assert not first.reused and first.features.shape[:2] == (6, 2) and first.features.dtype == torch.float16
    written = path.stat().st_mtime_ns
    again = cache()
    assert again.reused and path.stat().st_mtime_ns == written
    torch.testing.assert_close(again.features, first.features, rtol=0, atol=0)
    assert not list(path.parent.glob(".*.tmp"))

    assert not cache(crop_scale=(0.5, 1.0)).reused  # another transform
    assert cache(crop_scale=(0.5, 1.0)).reused
    assert not cache(crop_scale=(0.5, 1.0), views=3).reused
    assert not cache(crop_scale=(0.5, 1.0), views=3, seed=1).reused
    image = root / "class_1" / "2.png"
    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(image)  # another image
    os.utime(image, ns=(written + 10**9, written + 10**9))
    rebuilt = cache(crop_scale=(0.5, 1.0), views=3, seed=1)
    assert not rebuilt.reused
    with torch.no_grad():
        split.frozen[0][1].weight.mul_(2)  # other frozen weights
    assert not cache(crop_scale=(0.5, 1.0), views=3, seed=1).reused
    path.write_bytes(b"not a cache")  # damaged: rebuilt
    assert not cache().reused and cache().reused


def test_overwrite_keeps_the_feature_cache_and_removes_its_temporaries(tmp_path):
    (tmp_path / FEATURE_CACHE_FILE).write_bytes(b"cache")
    (tmp_path / f".{FEATURE_CACHE_FILE}.abc.tmp").write_bytes(b"half")
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    assert clear_previous_run(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [FEATURE_CACHE_FILE]


def test_runs_with_one_cache_dir_share_the_cache_of_their_fingerprint(tmp_path, capsys):
    """``trainer.cache_dir``: another head and loss on the same data, frozen weights, views and
    seed reuse the file; another seed gets its own file beside it; the run folders hold none."""
    shared = tmp_path / "caches"
    run = (*TINY_NET, "trainer.cache_features=2", "trainer.max_epochs=1", f"trainer.cache_dir={shared}")
    fit(_config(*run, out=tmp_path / "a"), run_test=False)
    first = sorted(shared.glob("feature_cache-*.pt"))
    assert len(first) == 1 and "feature cache: computing" in capsys.readouterr().out
    fit(_config(*run, "loss.name=contrastive", "model.uncertainty_dim=4", out=tmp_path / "b"), run_test=False)
    assert f"feature cache: reusing {first[0]}" in capsys.readouterr().out
    fit(_config(*run, "seed=1", out=tmp_path / "c"), run_test=False)
    assert "feature cache: computing" in capsys.readouterr().out
    assert len(list(shared.glob("feature_cache-*.pt"))) == 2
    assert not any((tmp_path / r / FEATURE_CACHE_FILE).exists() for r in "abc")
