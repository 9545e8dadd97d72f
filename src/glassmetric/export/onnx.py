"""Export the embedding model to ONNX (``glassmetric export --format onnx``).

The graph takes ``images`` (B, 3, H, W), normalised as the backbone expects, with a dynamic
batch size, and returns named outputs, the ones the model's heads produce, in this order:

=================  ===============  ========================================================
name               shape            head
=================  ===============  ========================================================
embedding          (B, D)           global (or the concatenated groups): L2-normalised
local              (B, g*g, D)      spatial grid (structural matching)
group_embeddings   (B, k, D/k)      attentive grouping
attention          (B, k, h, w)     attentive grouping
uncertainty        (B, Du)          introspective similarity
=================  ===============  ========================================================

Exported with ``torch.onnx.export`` (the dynamo exporter), and checked with ``onnx.checker``.
The model's ``metadata_props`` say how to feed it and what it returns (:func:`onnx_metadata`):
``glassmetric.input_size``, ``glassmetric.resize``, ``glassmetric.mean``, ``glassmetric.std``
(comma-separated RGB values for pixels scaled to [0, 1]: ``x = (pixel / 255 - mean) / std``),
``glassmetric.preprocessing`` (the same in words), ``glassmetric.output.<name>`` (each output's
meaning) and ``glassmetric.version``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glassmetric.errors import GlassmetricError

__all__ = [
    "EXPORT_FIELDS",
    "OUTPUT_MEANINGS",
    "ExportError",
    "OnnxModel",
    "compare_with_torch",
    "export_onnx",
    "onnx_metadata",
    "output_names",
]

#: the EmbeddingOutput fields that are exported, in output order (feature maps are not)
EXPORT_FIELDS = ("embedding", "local", "group_embeddings", "attention", "uncertainty")

#: what each output is, as the ONNX metadata states it
OUTPUT_MEANINGS = {
    "embedding": "(B, D) global embedding, L2-normalised: cosine similarity is the inner product",
    "local": "(B, g*g, D) local embeddings of the spatial grid cells, row-major (structural matching)",
    "group_embeddings": "(B, k, D/k) one embedding per attention group (attentive grouping)",
    "attention": "(B, k, h, w) each group's attention map over the feature map (attentive grouping)",
    "uncertainty": "(B, Du) the introspective uncertainty of the embedding (larger: less certain)",
}


class ExportError(GlassmetricError):
    """The model cannot be exported, or an export dependency is missing."""


def output_names(model: nn.Module, image_size: int) -> list[str]:
    """The :data:`EXPORT_FIELDS` ``model`` produces, found by running it once on zeros."""
    with torch.no_grad():
        out = model.eval()(torch.zeros(2, 3, image_size, image_size)).present()
    return [name for name in EXPORT_FIELDS if name in out]


class OnnxModel(nn.Module):
    """The model with a tuple of its present outputs, as the exported graph returns them."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images)
        return tuple(getattr(out, name) for name in self.names)


def onnx_metadata(model: Any, cfg: Any, image_size: int) -> dict[str, str]:
    """The preprocessing of ``model`` (an EmbeddingModel) and its ``cfg`` (a Config) at
    ``image_size``, as ONNX ``metadata_props`` (the ``glassmetric.output.*`` entries are added by
    :func:`export_onnx`)."""
    from glassmetric import __version__
    from glassmetric.data.transforms import default_resize

    resize = cfg.data.resize or default_resize(image_size)
    if image_size != (cfg.data.eval_image_size or cfg.data.image_size):  # the config's resize is for its own size
        resize = default_resize(image_size)
    mean, std = model.backbone.mean, model.backbone.std
    return {
        "glassmetric.version": __version__,
        "glassmetric.input_size": str(image_size),
        "glassmetric.resize": str(resize),
        "glassmetric.mean": ",".join(f"{m:g}" for m in mean),
        "glassmetric.std": ",".join(f"{s:g}" for s in std),
        "glassmetric.preprocessing": (
            f"RGB; resize the shorter side to {resize} px (bilinear), centre crop {image_size} x {image_size}; "
            "scale pixels to [0, 1], subtract mean and divide by std per channel; layout (batch, 3, H, W) float32"
        ),
    }


def export_onnx(
    model: nn.Module,
    path: str | Path,
    image_size: int,
    *,
    opset: int = 18,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Write ``model`` (eval mode, on the CPU) to ``path`` as ONNX; return its output names.
    ``metadata`` (e.g. :func:`onnx_metadata`) and each output's meaning become ``metadata_props``."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs the 'export' extra: pip install 'glassmetric[export]' ({e.name} missing)"
        ) from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    names = output_names(model, image_size)
    wrapper = OnnxModel(model, names).eval()
    example = torch.zeros(2, 3, image_size, image_size)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            verbose=False,
            input_names=["images"],
            output_names=names,
            opset_version=opset,
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            external_data=False,
        )
    assert program is not None  # the dynamo exporter returns the program
    program.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    props = {**(metadata or {}), **{f"glassmetric.output.{n}": OUTPUT_MEANINGS[n] for n in names}}
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    return names


def compare_with_torch(
    model: nn.Module, path: str | Path, image_size: int, *, batch: int = 3, seed: int = 0
) -> dict[str, float]:
    """Max abs difference of each output between onnxruntime (CPU) and torch on random images."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ExportError("checking the export needs onnxruntime: pip install 'glassmetric[export]'") from e
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = session.run(names, {"images": images.numpy()})
    with torch.no_grad():
        ref = model.eval().cpu()(images)
    return {n: float((torch.from_numpy(g) - getattr(ref, n)).abs().max()) for n, g in zip(names, got, strict=True)}
