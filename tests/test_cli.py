"""`python -m sam_viz analyze`: the JSON contract of DESIGN.md, and one-line errors with exit 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sam_viz.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sam_viz", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_json_has_the_design_keys_for_an_encoder():
    proc = run_cli("analyze", "--prompt", "The cat sat on the warm mat.", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["tokens"][:3] == ["[CLS]", "the", "cat"]
    assert out["model"] == "minilm" and out["policy"] == "topk" and out["target_density"] == 0.5
    assert out["density"] == pytest.approx(0.5)
    assert [l["layer"] for l in out["layers"]] == list(range(6))
    assert all(set(l) == {"layer", "density", "mass_kept", "recall", "precision", "projections"}
               and 0.5 < l["mass_kept"] < 1 and l["recall"] == 1.0 for l in out["layers"])   # topk is the oracle itself
    assert out["layers"][0]["projections"] == {"q": 1.0, "k": 1.0, "v": 1.0, "o": 1.0, "up": 0.5, "down": 0.5}
    assert out["scope"] == "mlp" and 0.5 < out["model_density"] < 1         # attention dense, the MLP at 0.5
    assert set(out["compare"]) == {"cosine", "max_abs_diff"}
    assert 0.8 < out["compare"]["cosine"] < 1


def test_json_for_a_causal_lm(capsys):
    assert main(["analyze", "--model", "tiny-llama", "--prompt", "one two three four", "--policy",
                 "threshold", "--density", "0.3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["compare"]) == {"kl", "top1_agreement", "max_abs_diff"}
    assert out["compare"]["kl"] >= 0 and 0 <= out["compare"]["top1_agreement"] <= 1
    assert len(out["layers"]) == 2 and out["tokens"] == ["one", "two", "three", "four"]


def test_table_output(capsys):
    assert main(["analyze", "--model", "tiny-bert", "--prompt", "hello there", "--policy", "dense"]) == 0
    out = capsys.readouterr().out
    assert "layer  density  mass_kept  recall  precision" in out and "cosine=1" in out


BAD = {
    "unknown model": ["--model", "gpt-17"],
    "path outside roots": ["--model", "/etc"],
    "traversal": ["--model", "../../x"],
    "hf not cached": ["--model", "hf:acme/missing"],
    "density not a number": ["--density", "abc"],
    "density zero": ["--density", "0"],
    "density above one": ["--density", "7"],
    "density nan": ["--density", "nan"],
    "unknown policy": ["--policy", "magic"],
    "unknown kernel": ["--kernel", "warp-drive"],
    "empty prompt": ["--prompt", ""],
    "blank prompt": ["--prompt", "   "],
    "prompt over token limit": ["--model", "tiny-llama", "--prompt", "word " * 600],
    "prompt over char limit": ["--model", "tiny-llama", "--prompt", "x" * 100_000],
    "unknown flag": ["--bogus", "1"],
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_error_line(case, capsys):
    args = ["analyze", "--prompt", "hello", *BAD[case]]
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.out == ""


def test_bad_input_in_a_real_process_has_no_traceback():
    for args in (["--model", "/etc/passwd"], ["--density", "abc"],
                 ["--model", "tiny-gpt2", "--prompt", "token " * 700]):
        proc = run_cli("analyze", "--prompt", "hi", *args)
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_library_imports_without_streamlit():
    code = "import sys, sam_viz, sam_viz.models, sam_viz.sparse_ops, sam_viz.cli; assert 'streamlit' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_test_command_sets_up_a_fresh_clone(tmp_path):
    """The README's `make test` creates .venv and installs requirements.txt when there is none."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    assert not (clone / ".venv").exists()
    dry = subprocess.run(["make", "-n", "test"], cwd=clone, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "-m venv .venv" in dry.stdout and "pip install --quiet -r requirements.txt" in dry.stdout
    assert "pytest" in dry.stdout
    for target in ("test", "run"):                                   # the cpu kernel is built at set-up
        dry = subprocess.run(["make", "-n", target], cwd=clone, capture_output=True, text=True, timeout=60)
        steps = dry.stdout.splitlines()
        build = next(i for i, line in enumerate(steps) if line.endswith("-m sam_viz build-kernels"))
        # "-m pytest", not "pytest": under `make test` (as CI runs it) this make is a sub-make, which prints
        # "make[2]: Entering directory '/tmp/pytest-of-root/...'" first
        assert build < next(i for i, line in enumerate(steps) if "-m pytest" in line or "-m streamlit run" in line)
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make run" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_default_kernel_is_cpu_where_it_is_built(capsys):
    from sam_viz.sparse_ops import cpu

    cpu.extension()                                                   # `make` builds it before the tests
    assert main(["analyze", "--model", "tiny-llama", "--prompt", "one two three", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kernel"] == "cpu"
    assert main(["analyze", "--model", "tiny-llama", "--prompt", "one two three", "--kernel", "reference",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kernel"] == "reference"


def test_triton_without_a_gpu_is_one_sentence_naming_why():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "sam_viz", "analyze", "--model", "tiny-llama", "--prompt", "hi",
                           "--kernel", "triton"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**env, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: the triton kernel cannot run here: "), \
        proc.stderr
    assert "CUDA GPU" in proc.stderr


def test_build_kernels_says_where_or_warns_and_never_fails(tmp_path):
    proc = run_cli("build-kernels")
    assert proc.returncode == 0 and proc.stdout.startswith("cpu kernel: ready (") and proc.stdout.count("\n") == 1
    from sam_viz.sparse_ops import cpu

    assert str(cpu.built_library().parent) in proc.stdout
    proc = run_cli("build-kernels", env={"TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": "no-such-compiler"})
    assert proc.returncode == 0 and proc.stdout == ""
    assert proc.stderr.startswith("warning: the cpu kernel cannot be used here: it needs a C++ compiler")
    assert proc.stderr.count("\n") == 1 and not list(tmp_path.rglob("*.so"))


def test_bench_without_the_cpu_kernel_is_one_sentence(monkeypatch, capsys):
    from sam_viz.sparse_ops import cpu

    monkeypatch.setattr(cpu, "readiness", lambda: ("unavailable", "it needs a C++ compiler to build"))
    assert main(["bench", "kernels", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err == "error: the benchmarks time the cpu kernel, which cannot run here: it needs a C++ compiler to build\n"
