"""The package as people install it: optional dependencies stay optional (evaluation works with
faiss, fastapi, uvicorn, tensorboard and onnx all missing), and the files an installable package
carries (LICENSE, py.typed, CITATION.cff, extras) are there."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import glassmetric

ROOT = Path(__file__).resolve().parents[1]
#: the imports of the extras: blocked in the subprocess as if they were not installed
OPTIONAL = ("faiss", "fastapi", "uvicorn", "multipart", "python_multipart", "tensorboard", "onnx", "onnxruntime")


def _run_without_extras(argvs: list[list[str]]) -> list[tuple[int, str]]:
    """``glassmetric argv`` for each of ``argvs``, in one subprocess where every OPTIONAL import
    fails: the exit status and stderr of each."""
    code = textwrap.dedent(
        f"""
        import contextlib, io, json, sys
        for name in {OPTIONAL!r}:
            sys.modules[name] = None  # import raises ImportError
        from glassmetric.cli import main
        results = []
        for argv in {argvs!r}:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                results.append((main(argv), err.getvalue()))
        print(json.dumps(results))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def test_without_any_extra_eval_gives_the_brute_force_metrics_and_extras_are_named(make_checkpoint, tmp_path):
    """Recall@K and R-Precision from the torch kNN equal a brute-force ranking of the same
    embeddings; NMI comes from sklearn's k-means. What needs an extra fails on one line naming it."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    from glassmetric import Retriever

    ckpt = str(make_checkpoint())
    out = tmp_path / "metrics.json"
    needs = [  # (the extra, a command line that needs it)
        ("faiss", ["eval", "--checkpoint", ckpt, "--knn", "faiss"]),
        ("faiss", ["eval", "--checkpoint", ckpt, "--index-dir", str(tmp_path / "index")]),
        ("serve", ["serve", "--checkpoint", ckpt]),
        ("export", ["export", "--checkpoint", ckpt, "--no-check", "-o", str(tmp_path / "m.onnx")]),
    ]
    (code, err), *failed = _run_without_extras(
        [["eval", "--checkpoint", ckpt, "--out", str(out)]] + [a for _, a in needs]
    )
    assert code == 0 and "faiss" not in err.lower() and "Traceback" not in err, err[-3000:]
    for (extra, argv), (code, err) in zip(needs, failed, strict=True):
        line = err.strip().splitlines()[-1]
        assert code == 2 and line.startswith(f"glassmetric {argv[0]}: error: "), err[-3000:]
        assert f"glassmetric[{extra}]" in line and "Traceback" not in err, err[-3000:]
    got = json.loads(out.read_text())["metrics"]

    retriever = Retriever.from_checkpoint(ckpt, "cpu")
    _, dataset, _ = retriever.eval_data(split="test")
    emb = retriever.embed(dataset).embedding.double()
    labels = torch.as_tensor(dataset.labels)
    sims = emb @ emb.T
    sims.fill_diagonal_(-float("inf"))  # a query is not its own neighbour
    order = sims.argsort(dim=1, descending=True, stable=True)  # ties: lower index first
    same = labels[order] == labels[:, None]
    for k in (1, 2, 4, 8):
        assert got[f"recall@{k}"] == pytest.approx(same[:, :k].any(1).double().mean().item(), abs=1e-9), k
    r = (labels[:, None] == labels[None]).sum(1) - 1
    rp = torch.stack([same[i, : r[i]].double().mean() for i in range(len(r))]).mean().item()
    assert got["r_precision"] == pytest.approx(rp, abs=1e-9)
    x = emb.float().numpy()
    clusters = KMeans(len(labels.unique()), n_init=10, random_state=retriever.cfg.seed).fit_predict(x)
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(labels.numpy(), clusters), abs=1e-6)


def test_fit_logs_to_tensorboard_only_where_it_is_installed(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from glassmetric.training.fit import _loggers

    assert [type(lg) for lg in _loggers(tmp_path, 0)] == [CSVLogger, TensorBoardLogger]
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert [type(lg) for lg in _loggers(tmp_path, 0)] == [CSVLogger]


def _pyproject() -> str:
    return (ROOT / "pyproject.toml").read_text()


def _requirements(section: str) -> list[str]:
    """The requirement names of a ``name = [ ... ]`` list of pyproject.toml."""
    body = re.search(rf"^{re.escape(section)} = \[(.*?)\]$", _pyproject(), re.MULTILINE | re.DOTALL)
    assert body, section
    return [re.split(r"[<>=\[]", r)[0] for r in re.findall(r'"([^"]+)"', body[1])]


def test_heavy_or_clashing_packages_are_extras_not_dependencies():
    core = _requirements("dependencies")
    for name in ("faiss-cpu", "fastapi", "uvicorn", "python-multipart", "tensorboard", "onnx", "onnxruntime"):
        assert name not in core, name
    assert _requirements("faiss") == ["faiss-cpu"]
    assert _requirements("serve") == ["fastapi", "uvicorn", "python-multipart"]
    assert _requirements("tensorboard") == ["tensorboard"]
    assert "onnx" in _requirements("export") and "onnxruntime" in _requirements("export")
    assert re.search(r'^all = \["glassmetric\[faiss,serve,export,weights,tensorboard\]"\]$', _pyproject(), re.M)


def test_license_typing_marker_and_citation_ship():
    assert 'license = "MIT"' in _pyproject() and 'license-files = ["LICENSE"]' in _pyproject()
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the glassmetric authors" in text
    assert (Path(glassmetric.__file__).parent / "py.typed").is_file()
    assert '"py.typed"' in re.search(r"^glassmetric = \[.*\]$", _pyproject(), re.M)[0]  # in the package data
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT" and cff["version"] == glassmetric.__version__
    papers = {(ref["authors"][0]["family-names"], ref["year"]): ref["title"] for ref in cff["references"]}
    assert set(papers) == {("Zhao", 2021), ("Xu", 2020), ("Wang", 2023)}
    assert "Structural Matching" in papers["Zhao", 2021] and "Attentive Grouping" in papers["Xu", 2020]
    assert papers["Wang", 2023] == "Introspective Deep Metric Learning"
