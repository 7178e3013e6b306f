"""sam-viz as a package (issue 21): one name per module in a clone (sam_viz.models, sam_viz.sparse_ops),
and the wheel as a researcher installs it into a bare environment: one top-level package, the demo
LMs inside it, and every built-in spec analysed by the `sam-viz` command from another folder.

The environments made here reuse the running interpreter's installed dependencies through a .pth
file (torch is not installed again); the wheel itself goes in with --no-deps.
"""
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import sam_viz
from sam_viz.models import BUILTIN_SPECS
from tools import rewrite_imports

ROOT = Path(__file__).resolve().parent.parent
OLD = ("models", "sparse_ops")               # the folders' names, which are no longer import names
MAX_WHEEL_BYTES = 36 * 2**20                # issue 21 asked ~25 MB for two demo LMs (10.5 MB each in fp16) and
                                            # the calibrations; issue 23 ships a third demo LM (demo-lm-all)
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
DENSITY = 0.25


def test_each_file_is_loaded_under_one_name():
    import sam_viz.cli  # noqa: F401
    import sam_viz.profile.view  # noqa: F401
    import sam_viz.sparse_ops.cpu  # noqa: F401

    assert [m for m in sys.modules if m.split(".")[0] in OLD] == []
    assert Path(sam_viz.models.__file__) == ROOT / "models" / "__init__.py"
    assert Path(sam_viz.sparse_ops.cpu.__file__) == ROOT / "sparse_ops" / "cpu.py"
    assert sam_viz.InputError is sam_viz.sparse_ops.cpu.InputError
    for name in OLD:                                  # the repository root is on sys.path here
        with pytest.raises(ImportError, match=f"import it by that name"):
            importlib.import_module(name)
    assert [m for m in sys.modules if m.split(".")[0] in OLD] == []


def test_the_tree_is_rewritten():
    """Nothing still imports the old names: after a merge, `python -m tools.rewrite_imports` fixes it."""
    assert rewrite_imports.main(["--check"]) == 0


def test_the_rewrite_rules_and_that_they_are_idempotent():
    m, s = OLD
    before = (f"from {m} import InputError\nfrom {s}.cpu import extension\nimport {s}.mlp\n"
              f"x = {s}.mlp.activations\nimport {m}\nimport sys, {m}, {s} as ops\n"
              f"patch('{m}.loading.DEMO_DIR')\ncode = \"import json, {s}.cpu as c; from {s} import cpu\"\n"
              f"from tokenizers import decoders, {m}\nrows = results['{m}']\n# see {m}/demo\n")
    after = (f"from sam_viz.{m} import InputError\nfrom sam_viz.{s}.cpu import extension\nimport sam_viz.{s}.mlp\n"
             f"x = sam_viz.{s}.mlp.activations\nfrom sam_viz import {m}\n"
             f"import sys, sam_viz.{m} as {m}, sam_viz.{s} as ops\npatch('sam_viz.{m}.loading.DEMO_DIR')\n"
             f"code = \"import json, sam_viz.{s}.cpu as c; from sam_viz.{s} import cpu\"\n"
             f"from tokenizers import decoders, {m}\nrows = results['{m}']\n# see {m}/demo\n")
    assert rewrite_imports.rewrite(before) == after
    assert rewrite_imports.rewrite(after) == after


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A copy of what the wheel is built from (tracked and untracked, not ignored): no build output
    lands in the tree."""
    src = tmp_path_factory.mktemp("pkg") / "src"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for rel in listed:
        if rel.split("/")[0] in ("sam_viz", *OLD, "pyproject.toml", "README.md") and (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    return src


@pytest.fixture(scope="module")
def wheel(source):
    out = source.parent / "dist"
    subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    found, = out.glob("sam_viz-*.whl")
    return found


def bare_env(where: Path) -> Path:
    """A venv without pip whose only extra packages are the running interpreter's (a .pth line)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_sam_viz_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def user_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_the_wheel_holds_one_package_with_its_data(wheel):
    assert wheel.stat().st_size <= MAX_WHEEL_BYTES
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = {n.split("/")[-1]: z.read(n).decode() for n in names if ".dist-info/" in n}
    assert {n.split("/")[0] for n in names} == {"sam_viz", wheel.name.split("-py3")[0] + ".dist-info"}
    assert meta["top_level.txt"].split() == ["sam_viz"]
    assert "sam-viz = sam_viz.cli:main_entry" in meta["entry_points.txt"]
    demo = "sam_viz/models/demo/"
    for needed in ("sam_viz/sparse_ops/csrc/sparse_mlp.cpp", "sam_viz/sparse_ops/csrc/sparse_mlp_kernel.h",
                   "sam_viz/sparse_ops/data/calibration.json", "sam_viz/data/triton_h200.json",
                   "sam_viz/benchmarks/kernels.py", "sam_viz/figures/firing.py", "sam_viz/profile/view.py",
                   "sam_viz/models/tiny.py",
                   *(f"{demo}{f}" for f in ("heldout.txt", "claims.json", "LICENSE-DATA.txt", "README.md")),
                   *(f"{demo}{m}/{f}" for m in ("demo-lm", "demo-lm-dense")
                     for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"))):
        assert needed in names
    shipped = sorted(p.name for p in (ROOT / "sparse_ops" / "data" / "calibrations").glob("*.safetensors"))
    assert shipped and all(f"sam_viz/sparse_ops/data/calibrations/{n}" in names for n in shipped)
    assert not [n for n in names if n.endswith(".png") or "/training/" in n]


ARGS = ["--prompt", "The for statement loops", "--policy", "topk", "--density", str(DENSITY), "--json"]
# every built-in spec through the installed CLI in one interpreter (a process each cost 10 imports of torch
# and transformers); the `sam-viz` command itself runs beside it, and once more with a demo file gone
BATCH = """
import contextlib, io, json, sys
from sam_viz.cli import main
out = {}
for spec in sys.argv[1:]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["analyze", "--model", spec, *ARGS])
    out[spec] = [code, stdout.getvalue()]
print(json.dumps(out))
""".replace("ARGS", repr(ARGS))


def command(sam_viz_command: Path, spec: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(sam_viz_command), "analyze", "--model", spec, *ARGS], cwd=cwd, env=user_env(),
                          capture_output=True, text=True, timeout=300)


def check_analysis(spec: str, out: dict) -> None:
    assert out["model"] == spec and out["tokens"] and out["layers"], spec
    assert abs(out["density"] - DENSITY) <= 0.01, (spec, out["density"])
    assert all(abs(layer["density"] - DENSITY) <= 0.01 for layer in out["layers"]), spec
    compare = out["compare"]
    assert math.isfinite(compare["max_abs_diff"]), spec
    if "kl" in compare:
        assert 0 <= compare["kl"] < 10 and 0 <= compare["top1_agreement"] <= 1, (spec, compare)
    else:
        assert 0.5 < compare["cosine"] <= 1 + 1e-6, (spec, compare)


def test_every_builtin_spec_runs_from_the_installed_wheel(wheel, tmp_path):
    from sam_viz.sparse_ops import cpu

    python = bare_env(tmp_path / "venv")
    subprocess.run([*PIP, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    sam_viz_command = python.parent / "sam-viz"
    notebook = tmp_path / "notebook"
    notebook.mkdir()
    cpu.extension()                                                   # `make` builds it before the tests
    built = cpu.built_library().stat().st_mtime_ns
    with ThreadPoolExecutor(2) as pool:
        batch = pool.submit(subprocess.run, [str(python), "-c", BATCH, *BUILTIN_SPECS], cwd=notebook, env=user_env(),
                            capture_output=True, text=True, timeout=600)
        demo = command(sam_viz_command, "demo-lm", notebook)
        batch = batch.result()
    assert demo.returncode == 0, demo.stderr[-2000:]
    check_analysis("demo-lm", json.loads(demo.stdout))
    assert json.loads(demo.stdout)["kernel"] == "cpu"
    assert batch.returncode == 0, batch.stderr[-2000:]
    results = json.loads(batch.stdout.strip().splitlines()[-1])
    assert list(results) == list(BUILTIN_SPECS)
    for spec, (code, stdout) in results.items():
        assert code == 0, (spec, batch.stderr[-2000:])
        check_analysis(spec, json.loads(stdout))
    assert cpu.built_library().stat().st_mtime_ns == built           # the installed sources load the same build

    site = Path(subprocess.run([str(python), "-c", "import sam_viz; print(sam_viz.__file__)"], cwd=notebook,
                               env=user_env(), capture_output=True, text=True, check=True).stdout.strip()).parent
    assert site.is_relative_to(tmp_path / "venv") and not (site.parent / "models").exists()
    (site / "models" / "demo" / "demo-lm" / "model.safetensors").unlink()
    proc = command(sam_viz_command, "demo-lm", notebook)
    assert proc.returncode == 2 and proc.stderr.startswith("error: the shipped model 'demo-lm' is missing")
    assert "reinstall sam-viz" in proc.stderr and "git" not in proc.stderr


def test_an_editable_install_imports_the_folders_of_the_source(source, wheel, tmp_path):
    """`pip install -e .`: the same names, from the source folders (the wheel fixture ran first: its
    build output in the copy is what a clone's own `pip wheel .` would leave)."""
    python = bare_env(tmp_path / "venv")
    subprocess.run([*PIP, "--python", str(python), "install", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-e", str(source)], check=True, capture_output=True, timeout=300)
    code = ("import json, sys, sam_viz, sam_viz.models.loading as l, sam_viz.sparse_ops.cpu as c; "
            "print(json.dumps([l.__file__, c.__file__, c.SOURCE.is_file(), (l.DEMO_DIR / 'heldout.txt').is_file(), "
            "[m for m in sys.modules if m.split('.')[0] in ('models', 'sparse_ops')]]))")
    proc = subprocess.run([str(python), "-c", code], cwd=tmp_path, env=user_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loading, kernel, has_source, has_text, old = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(loading) == source / "models" / "loading.py" and Path(kernel) == source / "sparse_ops" / "cpu.py"
    assert has_source and has_text and old == []
