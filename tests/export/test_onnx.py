"""ONNX export: onnxruntime against torch on every head type, dynamic batch, the CLI."""

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from glassmetric.checkpoints import load_trained  # noqa: E402
from glassmetric.cli import main  # noqa: E402
from glassmetric.config import load_config  # noqa: E402
from glassmetric.export.onnx import export_onnx  # noqa: E402
from glassmetric.factory import build_model_from_config  # noqa: E402


def run_onnx(path, images: torch.Tensor) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"images": images.numpy()}), strict=True))


def test_all_heads_export_with_a_dynamic_batch(tmp_path):
    cfg = load_config(
        "demo_scratch",
        [
            "model.embedding_dim=16",
            "model.groups=2",
            "model.spatial_grid=2",
            "model.spatial_head=own",
            "model.uncertainty_dim=8",
        ],
    )
    torch.manual_seed(0)
    model = build_model_from_config(cfg).eval()
    names = export_onnx(model, tmp_path / "all.onnx", 64)
    assert names == ["embedding", "local", "group_embeddings", "attention", "uncertainty"]
    graph = onnx.load(str(tmp_path / "all.onnx")).graph
    assert [o.name for o in graph.output] == names
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch size
    images = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # exported with 2
    got = run_onnx(tmp_path / "all.onnx", images)
    with torch.no_grad():
        ref = model(images)
    assert got["local"].shape == (5, 4, 16) and got["attention"].shape == (5, 2, 2, 2)
    for name in names:
        assert np.abs(got[name] - getattr(ref, name).numpy()).max() <= 1e-4, name


def test_cli_exports_a_checkpoint(tmp_path, make_checkpoint, capsys):
    ckpt = make_checkpoint("data.image_size=64", "data.resize=64")
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "outputs embedding" in printed and "onnxruntime vs torch" in printed
    model, _ = load_trained(str(ckpt))
    images = torch.rand(3, 3, 64, 64)
    got = run_onnx(out, images)
    assert list(got) == ["embedding"]
    with torch.no_grad():
        assert np.abs(got["embedding"] - model(images).embedding.numpy()).max() <= 1e-4


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.ckpt" in err and len(err.splitlines()) == 1
