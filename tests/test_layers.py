"""The package's layers import downwards only: no import cycle between modules, and inference
(load, embed, re-rank, explain) never imports the trainer."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import glassmetric

SRC = Path(glassmetric.__file__).resolve().parent


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Name | ast.Attribute)
            and ast.unparse(node.test).endswith("TYPE_CHECKING")
        ):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """module -> the glassmetric modules it imports when run, anywhere (imports inside functions
    included; ``if TYPE_CHECKING:`` blocks left out)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}

    def owner(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {owner(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                for a in node.names:  # `from pkg import module` imports that module
                    targets.add(owner(f"{base}.{a.name}") if f"{base}.{a.name}" in modules else owner(base))
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_sees_an_import_inside_a_function(tmp_path):
    pkg = tmp_path / "glassmetric"
    (pkg / "retrieval").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "retrieval" / "__init__.py").write_text("")
    (pkg / "retrieval" / "knn.py").write_text("def f():\n    from .index import GalleryIndex\n")
    (pkg / "retrieval" / "index.py").write_text("from .knn import knn\n")
    (pkg / "retrieval" / "metrics.py").write_text("from glassmetric.retrieval import knn\n")
    assert cycles(import_graph(pkg)) == [["glassmetric.retrieval.index", "glassmetric.retrieval.knn"]]


def test_the_cycle_finder_leaves_out_type_checking_imports(tmp_path):
    pkg = tmp_path / "glassmetric"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def check():\n    from glassmetric.settings import Settings\n")
    (pkg / "settings.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from glassmetric.config import Config\n"
    )
    assert cycles(import_graph(pkg)) == []
    (pkg / "settings.py").write_text("import glassmetric.config\n")
    assert cycles(import_graph(pkg)) == [["glassmetric.config", "glassmetric.settings"]]


def test_no_import_cycle_between_modules():
    assert cycles(import_graph()) == []


def test_inference_never_imports_lightning(tmp_path, make_checkpoint):
    """Load, embed, re-rank and explain in a fresh interpreter, then look at sys.modules."""
    ckpt = make_checkpoint("data.image_size=64", "data.resize=64")
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 40), (60 * i, 100, 200 - 50 * i)).save(tmp_path / f"{i}.png")
    script = textwrap.dedent(f"""
        import sys, glassmetric
        r = glassmetric.Retriever.from_checkpoint({str(ckpt)!r}, device="cpu")
        e = r.embed({str(tmp_path)!r})
        r.rerank(e, k=2)
        r.explain({str(tmp_path / "0.png")!r}, {str(tmp_path / "1.png")!r})
        glassmetric.Retriever.from_preset("demo_scratch")
        print(sorted(m for m in sys.modules if m.split(".")[0] == "lightning" or m.startswith("glassmetric.training")))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
