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


def test_the_onnx_metadata_describes_the_preprocessing_that_reproduces_the_embeddings(tmp_path, make_checkpoint):
    """Preprocessing an image by the file's metadata_props alone (PIL and numpy, no glassmetric)
    and running the graph gives the embeddings of Retriever.embed."""
    from PIL import Image

    from glassmetric import Retriever

    ckpt = make_checkpoint("data.image_size=64", "data.resize=72", "model.groups=2")
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "-o", str(out), "--no-check"]) == 0
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    retriever = Retriever.from_checkpoint(ckpt, "cpu")
    backbone = retriever.model.model.backbone
    assert props["glassmetric.input_size"] == "64" and props["glassmetric.resize"] == "72"
    mean = np.array([float(v) for v in props["glassmetric.mean"].split(",")], dtype=np.float32)
    std = np.array([float(v) for v in props["glassmetric.std"].split(",")], dtype=np.float32)
    assert np.allclose(mean, backbone.mean) and np.allclose(std, backbone.std)
    outputs = [o.name for o in onnx.load(str(out)).graph.output]
    assert {k.removeprefix("glassmetric.output.") for k in props if k.startswith("glassmetric.output.")} == set(outputs)

    image = Image.fromarray((np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8))
    size, resize = int(props["glassmetric.input_size"]), int(props["glassmetric.resize"])
    w, h = image.size
    scaled = image.resize((round(w * resize / h), resize), Image.BILINEAR)  # shorter side (height) to resize
    left, top = (scaled.width - size) // 2, (scaled.height - size) // 2
    crop = np.asarray(scaled.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    x = ((crop - mean) / std).transpose(2, 0, 1)[None]
    got = run_onnx(out, torch.from_numpy(np.ascontiguousarray(x)))
    ref = retriever.embed([image])
    assert np.abs(got["embedding"] - ref.embedding.numpy()).max() < 2e-2
    assert np.abs(got["attention"] - ref.attention.numpy()).max() < 2e-2
