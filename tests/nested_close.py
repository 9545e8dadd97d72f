"""Equality of nested checkpoint contents (dicts, lists, tensors) for the resume tests."""

import torch


def assert_nested_close(a, b, where: str = "checkpoint") -> None:
    """``a`` and ``b`` have the same keys and lengths, tensors within 1e-6 and everything else
    equal; a failure names the path to the first difference."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_nested_close(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_nested_close(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m: f"{where}: {m}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
