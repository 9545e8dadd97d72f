"""Grouping head (DGML): attention, permutation invariance, unit-norm concatenation, backbones."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from glassmetric.config import load_config
from glassmetric.errors import ConfigError
from glassmetric.factory import build_model_from_config
from glassmetric.models import build_model
from glassmetric.models.grouping_head import GroupingHead
from glassmetric.models.output import EmbeddingOutput
from glassmetric.retriever.model import InferenceModel


def _run(head: GroupingHead, fmap: torch.Tensor) -> dict:
    return head(fmap, fmap.mean((2, 3)), EmbeddingOutput(embedding=torch.zeros(len(fmap), 1)))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    groups=st.integers(1, 4),
    channels=st.sampled_from([8, 16, 24]),
)
def test_group_outputs_are_invariant_to_permutations_of_the_positions(seed, h, w, groups, channels):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = GroupingHead(channels, 4 * groups, groups)
    fmap = torch.randn(2, channels, h, w, generator=g)
    perm = torch.randperm(h * w, generator=g)
    shuffled = fmap.flatten(2)[:, :, perm].reshape(2, channels, h, w)
    a, b = _run(head, fmap), _run(head, shuffled)
    torch.testing.assert_close(a["group_embeddings"], b["group_embeddings"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["embedding"], b["embedding"], rtol=1e-5, atol=1e-6)
    # the attention moves with its positions
    torch.testing.assert_close(a["attention"].flatten(2)[:, :, perm], b["attention"].flatten(2))


@torch.no_grad()
def test_attention_sums_to_one_and_matches_a_brute_force_softmax():
    torch.manual_seed(0)
    head = GroupingHead(16, 12, groups=3)
    fmap = torch.randn(2, 16, 3, 5)
    out = _run(head, fmap)
    assert out["attention"].shape == (2, 3, 3, 5)
    torch.testing.assert_close(out["attention"].sum((2, 3)), torch.ones(2, 3))
    wk, wv = head.keys.weight[:, :, 0, 0], head.values.weight[:, :, 0, 0]
    for b in range(2):
        positions = [fmap[b, :, p // 5, p % 5] for p in range(15)]
        for i in range(3):
            a = torch.stack([head.queries[i] @ (wk @ f + head.keys.bias) for f in positions]).softmax(0)
            torch.testing.assert_close(out["attention"][b, i].flatten(), a, rtol=1e-5, atol=1e-6)
            o = sum(a[p] * (wv @ f + head.values.bias) for p, f in enumerate(positions))
            torch.testing.assert_close(out["group_embeddings"][b, i], F.normalize(o, dim=0), rtol=1e-5, atol=1e-6)


def test_concatenation_is_unit_norm_and_its_cosine_is_the_mean_of_group_cosines():
    torch.manual_seed(1)
    head = GroupingHead(16, 24, groups=4)
    out = _run(head, torch.randn(5, 16, 4, 4))
    e, g = out["embedding"], out["group_embeddings"]
    assert e.shape == (5, 24) and g.shape == (5, 4, 6)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(5, 4))
    per_group = torch.einsum("akd,bkd->abk", g, g)  # (5, 5, k) cosine of every pair, per group
    torch.testing.assert_close(e @ e.T, per_group.mean(-1))
    assert head.key_dim == 2  # C / 8


def test_gradients_reach_queries_keys_and_values():
    torch.manual_seed(2)
    head = GroupingHead(8, 6, groups=3)
    out = _run(head, torch.randn(3, 8, 3, 3))
    (out["embedding"] @ torch.randn(6)).sum().backward()
    for p in (head.queries, head.keys.weight, head.values.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", ["model.embedding_dim=64", "model.groups=-1", "model.groups=100"])
def test_bad_group_configs_name_the_key(bad):
    with pytest.raises(ConfigError, match=r"model\.groups"):
        load_config("demo_scratch", ["model.groups=3", bad])
    with pytest.raises(ConfigError, match=r"model\.groups"):
        GroupingHead(8, 10, groups=3)


def test_shared_spatial_head_is_refused_with_groups_and_the_own_head_composes():
    with pytest.raises(ConfigError, match=r"model\.spatial_head"):
        load_config("demo_scratch", ["model.groups=2", "model.spatial_grid=4"])
    cfg = load_config(
        "demo_scratch", ["model.groups=2", "model.spatial_grid=4", "model.spatial_head=own", "model.embedding_dim=16"]
    )
    model = build_model_from_config(cfg)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.local.shape == (2, 16, 16) and out.group_embeddings.shape == (2, 2, 8)
    assert out.attention.shape == (2, 2, 2, 2)
    torch.testing.assert_close(out.embedding, out.group_embeddings.flatten(1) / math.sqrt(2))
    groups = model.parameter_groups()
    assert {"grouping.kv", "grouping.queries", "spatial"} <= set(groups)
    assert groups["grouping.queries"] == [model.extra_heads["grouping"].queries]


def test_training_free_structural_matching_refuses_a_grouping_model_without_spatial_head():
    model = build_model("resnet18", 6)
    model.add_head("grouping", GroupingHead(512, 6, 3))
    view = InferenceModel(model)
    assert "local" not in view.fields
    with pytest.raises(ConfigError, match="spatial_head=own"):
        view.require_local()
    assert set(model.extra_heads) == {"grouping"}  # the model is not changed


@pytest.mark.parametrize(
    "backbone, kwargs, grid",
    [
        ("efficientnet_lite0", None, 2),
        ("timm:resnet10t", None, 2),
        ("timm:vit_tiny_patch16_224", {"img_size": 64}, 4),
    ],
)
def test_grouping_works_on_every_kind_of_backbone(backbone, kwargs, grid):
    model = build_model(backbone, 12, timm_kwargs=kwargs)
    model.add_head("grouping", GroupingHead(model.backbone.out_channels, 12, 3))
    out = model(torch.randn(2, 3, 64, 64))
    assert out.attention.shape == (2, 3, grid, grid) and out.group_embeddings.shape == (2, 3, 4)
    torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(2))


def test_grouping_under_bf16_autocast_stays_normalised():
    torch.manual_seed(3)
    head = GroupingHead(16, 12, groups=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run(head, torch.randn(2, 16, 4, 4))
    assert all(torch.isfinite(v.float()).all() for v in out.values())
    torch.testing.assert_close(out["attention"].float().sum((2, 3)), torch.ones(2, 3), atol=2e-2, rtol=0)
    torch.testing.assert_close(out["embedding"].float().norm(dim=1), torch.ones(2), atol=2e-2, rtol=0)


def test_small_initial_queries_start_every_group_near_average_pooling():
    """``query_std``: the queries are N(0, std^2) (same draws, scaled), so with a small std the
    attention starts near uniform and each group near the average-pooled values (brute force),
    while the default start is peaked; the config key reaches the head and is range-checked."""
    fmap = torch.randn(2, 64, 5, 6)
    torch.manual_seed(0)
    peaked = GroupingHead(64, 32, groups=4)
    torch.manual_seed(0)
    flat = GroupingHead(64, 32, groups=4, query_std=1e-3)
    torch.testing.assert_close(flat.queries, peaked.queries * 1e-3)
    flat.keys.load_state_dict(peaked.keys.state_dict())
    flat.values.load_state_dict(peaked.values.state_dict())
    a_flat, g_flat = flat.attend(fmap)
    a_peak, _ = peaked.attend(fmap)
    uniform = torch.full_like(a_flat, 1 / 30)
    assert (a_flat - uniform).abs().max() < 1e-3 < (a_peak - uniform).abs().max()
    mean_values = flat.values(fmap).flatten(2).mean(-1)  # (B, D/k): average pooling of the values
    for i in range(4):
        torch.testing.assert_close(g_flat[:, i], mean_values, atol=2e-3, rtol=0)
    cfg = load_config(
        "demo_scratch",
        ["model.groups=4", "model.embedding_dim=32", "model.group_query_std=0.1", "model.backbone=timm:test_resnet"],
    )
    assert build_model_from_config(cfg).extra_heads["grouping"].queries.abs().max() < 1.0
    with pytest.raises(ConfigError, match=r"model\.group_query_std"):
        load_config("demo_scratch", ["model.groups=4", "model.group_query_std=0"])
