"""Weights-only export: a safetensors file of the model's weights and config that loads back to
the same model as the .ckpt it came from."""

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from glassmetric import Retriever
from glassmetric.cli import main
from glassmetric.errors import CheckpointError


def _images(n: int = 5) -> list[Image.Image]:
    g = torch.Generator().manual_seed(3)
    return [Image.fromarray((torch.rand(70, 90, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


@pytest.mark.parametrize(
    "overrides",
    [(), ("model.groups=2", "model.spatial_grid=2", "model.spatial_head=own", "model.uncertainty_dim=4")],
    ids=["global", "all-heads"],
)
def test_weights_export_loads_back_to_the_same_embeddings(make_checkpoint, tmp_path, capsys, overrides):
    ckpt = make_checkpoint(*overrides)
    out = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "weights", "-o", str(out)]) == 0
    assert f"{out}: the model's weights and config" in capsys.readouterr().out

    stored = torch.load(ckpt, weights_only=True)  # the reference: the .ckpt as torch reads it
    with safe_open(str(out), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        same = all(torch.equal(f.get_tensor(k), stored["state_dict"][f"model.{k}"]) for k in keys)
    assert keys == {k.removeprefix("model.") for k in stored["state_dict"]} and same  # weights only, all of them
    config = json.loads(meta["glassmetric"])["config"]
    assert config == json.loads(json.dumps(stored["glassmetric"]["config"]))  # tuples are JSON lists

    from_ckpt, from_weights = Retriever.from_checkpoint(ckpt, "cpu"), Retriever.from_checkpoint(out, "cpu")
    assert from_weights.fields == from_ckpt.fields and from_weights.cfg == from_ckpt.cfg
    a, b = from_ckpt.embed(_images()), from_weights.embed(_images())
    for field in from_ckpt.fields:
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_a_damaged_or_foreign_safetensors_file_is_a_one_line_error(make_checkpoint, tmp_path):
    from safetensors.torch import save_file

    ckpt = make_checkpoint()
    out = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "weights", "-o", str(out)]) == 0
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cannot load weights file .*cut\.safetensors \(truncated or damaged\)"):
        Retriever.from_checkpoint(cut, "cpu")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="no glassmetric config in its metadata"):
        Retriever.from_checkpoint(foreign, "cpu")
