"""The house rules that a reader of the tree can check: dependencies point one way (pages and app ->
sam_viz -> sparse_ops -> models; nothing but bench/ imports bench/), and the project installs as a
package with its data files and the `sam-viz` command (pyproject.toml)."""
import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
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


def test_the_wheel_installs_the_packages_their_data_and_the_command(tmp_path):
    """Built from a copy of the tracked sources (no build output lands in the tree), installed into a
    bare folder, and used from elsewhere: imports, data files, and `sam-viz` itself."""
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    for rel in tracked.splitlines():
        if rel.split("/")[0] in (*LIBRARY, "pyproject.toml", "README.md"):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("sam_viz-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for needed in ("sparse_ops/csrc/sparse_mlp.cpp", "sparse_ops/csrc/sparse_mlp_kernel.h",
                   "sparse_ops/data/calibration.json", "sam_viz/data/triton_h200.json",
                   "sam_viz/benchmarks/kernels.py", "models/tiny.py"):
        assert needed in names
    assert "sam-viz = sam_viz.cli:main_entry" in entry_points
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "notebook"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    code = ("import json, sam_viz, sam_viz.models as models, sam_viz.sparse_ops as sparse_ops; from sam_viz.sparse_ops import cpu, calibration; "
            "from sam_viz import speed; print(json.dumps([sam_viz.__file__, cpu.SOURCE.is_file(), "
            "calibration.DATA.is_file(), len(speed.saved_gpu_rows()[1])]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    where, has_source, has_texts, gpu_rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(where).is_relative_to(target) and has_source and has_texts and gpu_rows > 0
    from sam_viz.sparse_ops import cpu

    cpu.extension()                                                   # `make` builds it before the tests
    built = cpu.built_library().stat().st_mtime_ns
    sam_viz_command = str(target / "bin" / "sam-viz")
    proc = subprocess.run([sam_viz_command, "analyze", "--model", "tiny-bert", "--prompt", "hello there", "--policy",
                           "dense", "--kernel", "cpu", "--json"], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["compare"]["cosine"] > 0.9999                   # dense is the model itself
    assert cpu.built_library().stat().st_mtime_ns == built          # the installed copy loads, not rebuilds, it
    proc = subprocess.run([sam_viz_command, "analyze", "--prompt", ""], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
