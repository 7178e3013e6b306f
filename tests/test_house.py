"""The house rules that a reader of the tree can check: dependencies point one way (pages and app ->
sam_viz -> sparse_ops -> models; nothing but bench/ imports bench/). The package as installed:
tests/test_package.py."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ("sam_viz", "models", "sparse_ops")


def part(module: str) -> str:
    """The part a module belongs to: its top-level name, but `models` and `sparse_ops` for
    sam_viz.models and sam_viz.sparse_ops (the folders beside sam_viz/, installed inside it)."""
    names = module.split(".")
    return names[1] if names[0] == "sam_viz" and len(names) > 1 and names[1] in LIBRARY else names[0]


def imported(path: Path) -> set[str]:
    """The parts of every module that the file imports, anywhere in it (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {part(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {part(f"{node.module}.{a.name}") for a in node.names}
    return names


def sources(*parts: str) -> list[Path]:
    out = []
    for part in parts:
        p = ROOT / part
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def test_nothing_outside_bench_imports_bench():
    files = sources(*LIBRARY, "pages", "app.py")
    assert len(files) > 20
    assert [str(f.relative_to(ROOT)) for f in files if "bench" in imported(f)] == []


def test_pages_reach_models_only_through_sam_viz():
    files = sources("pages", "app.py")
    assert [str(f.relative_to(ROOT)) for f in files if "models" in imported(f)] == []


def test_the_library_imports_neither_streamlit_nor_the_app():
    files = sources(*LIBRARY)
    bad = [str(f.relative_to(ROOT)) for f in files if imported(f) & {"streamlit", "pages", "app", "bench"}]
    assert bad == []
