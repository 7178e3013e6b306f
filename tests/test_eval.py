"""`python -m sam_viz eval` and the shipped demo LMs (models/demo/).

Perplexity is checked against a computation written out here: windows w = ids[w*C : w*C + C + 1]
taken one by one, a plain transformers forward, F.cross_entropy, exp of the mean over all targets;
the sparse model's reference is tools/topk_mlp (the masked MLP it was trained with). Nothing here
depends on the values of the shipped weights, which are replaced when training ends.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import HELD_OUT, shared
from sam_viz.models import BUILTIN_SPECS, InputError, load_model
from sam_viz.models.loading import DEMO_DIR, DEMO_SPECS
from sam_viz import evaluate as ev
from sam_viz.cli import main
from sam_viz.sparse_ops import default_kernel
from tools import demo_data, topk_mlp

ROOT = Path(__file__).resolve().parent.parent
SEP = "<|endoftext|>"
KEYS = {"model": str, "policy": str, "density": float, "kernel": str, "text": str, "context": int,
        "windows": int, "tokens": int, "loss": float, "perplexity": float, "mlp_density": float,
        "scope": str, "model_density": float}          # scope mlp: the whole-model matrix work beside the MLP's


pytestmark = pytest.mark.usefixtures("one_thread")


def hand_perplexity(model, ids: list[int], context: int, max_windows: int | None = None) -> float:
    losses = []
    n = (len(ids) - 1) // context
    for w in range(n if max_windows is None else min(n, max_windows)):
        window = torch.tensor(ids[w * context: w * context + context + 1])
        with torch.no_grad():
            logits = model(input_ids=window[None, :-1]).logits[0]             # [C, V]
        losses.append(F.cross_entropy(logits.double(), window[1:], reduction="none"))
    return math.exp(float(torch.cat(losses).mean()))


def demo_ids(tokenizer, n: int) -> list[int]:
    """The held-out split's first n tokens as training saw them: each document after the special token."""
    ids = []
    for doc in (DEMO_DIR / "heldout.txt").read_text(encoding="utf-8").split(SEP):
        ids += [tokenizer.convert_tokens_to_ids(SEP)] + tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            return ids[:n]
    return ids


def plain(name: str):
    path = DEMO_DIR / name
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def run_eval(capsys, *args) -> dict:
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_library_perplexity_equals_hand_computation_on_tiny_llama(fresh):
    docs = [" ".join(HELD_OUT[:3]), " ".join(HELD_OUT[3:])]
    loaded = shared("tiny-llama")
    result = ev.evaluate(loaded, ev.EvalSpec(model="tiny-llama", context=4), SEP.join(docs))
    tok = loaded.tokenizer                    # tiny causal models add no special tokens (no [CLS] / [SEP])
    ids = [i for d in docs for i in tok(d, add_special_tokens=False)["input_ids"]]
    assert result.windows == (len(ids) - 1) // 4 > ev.BATCH                # more than one batch
    assert result.tokens == result.windows * 4 and result.mlp_density == 1.0
    assert result.perplexity == pytest.approx(hand_perplexity(fresh("tiny-llama").model, ids, 4), rel=1e-5)


def test_dense_eval_of_demo_lm_dense_equals_hand_computation(capsys):
    out = run_eval(capsys, "--model", "demo-lm-dense", "--max-tokens", "600")
    model, tok = plain("demo-lm-dense")
    assert (out["windows"], out["tokens"], out["context"], out["text"]) == (4, 512, 128, "heldout")
    assert out["perplexity"] == pytest.approx(hand_perplexity(model, demo_ids(tok, 513), 128), rel=1e-5)
    assert out["mlp_density"] == 1.0 and out["loss"] == pytest.approx(math.log(out["perplexity"]))


def test_topk_eval_of_demo_lm_equals_the_masked_mlp_it_was_trained_with(capsys):
    out = run_eval(capsys, "--model", "demo-lm", "--policy", "topk", "--density", "0.1", "--max-tokens", "256")
    model, tok = plain("demo-lm")
    topk_mlp.set_density(topk_mlp.install(model), 0.1)
    assert out["windows"] == 2 and out["density"] == 0.1
    assert out["perplexity"] == pytest.approx(hand_perplexity(model, demo_ids(tok, 257), 128), rel=1e-4)
    assert out["mlp_density"] == pytest.approx(round(0.1 * 1024) / 1024)   # k of d_ff, every token and layer


def test_heldout_windows_are_those_of_tools_demo_data():
    text = ev.read_text(None)
    docs = ev.documents(text)
    assert SEP.join(docs) == text and len(docs) == len(text.split(SEP))    # nothing dropped or changed
    loaded = shared("demo-lm")
    expected = demo_data.windows(torch.cat(demo_data.split_tokens(
        loaded.tokenizer, [demo_data.Document(str(i), d) for i, d in enumerate(docs)])), 128)
    assert torch.equal(ev.windows(ev.text_tokens(loaded, docs), 128), expected)


def test_eval_json_keys_and_types_in_a_real_offline_process():
    proc = subprocess.run([sys.executable, "-m", "sam_viz", "eval", "--model", "demo-lm", "--policy", "threshold",
                           "--density", "0.25", "--max-tokens", "300", "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {k: type(v) for k, v in out.items()} == KEYS
    assert out["model"] == "demo-lm" and out["text"] == "heldout" and out["kernel"] == default_kernel()
    assert (out["policy"], out["density"], out["windows"], out["tokens"]) == ("threshold", 0.25, 2, 256)
    assert out["perplexity"] > 1 and 0 < out["mlp_density"] < 1


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


BAD = {
    "encoder": lambda t: ["--model", "minilm"],
    "unknown model": lambda t: ["--model", "gpt-17"],
    "missing text file": lambda t: ["--text", str(t / "nope.txt")],
    "unreadable text file": lambda t: ["--text", str(t)],
    "binary text file": lambda t: ["--text", _write(t, "b.bin", bytes(range(256)))],
    "text with NUL bytes": lambda t: ["--text", _write(t, "n.txt", "abc\x00def " * 100)],
    "empty text file": lambda t: ["--text", _write(t, "e.txt", "")],
    "blank text file": lambda t: ["--text", _write(t, "w.txt", "  \n\n \t")],
    "separators only": lambda t: ["--text", _write(t, "s.txt", SEP * 3)],
    "text under one window": lambda t: ["--text", _write(t, "short.txt", "A short text of a few tokens.")],
    "density not a number": lambda t: ["--policy", "topk", "--density", "abc"],
    "density zero": lambda t: ["--policy", "topk", "--density", "0"],
    "density above one": lambda t: ["--policy", "topk", "--density", "7"],
    "density nan": lambda t: ["--policy", "topk", "--density", "nan"],
    "unknown policy": lambda t: ["--policy", "magic"],
    "unknown kernel": lambda t: ["--kernel", "warp-drive"],
    "max-tokens zero": lambda t: ["--max-tokens", "0"],
    "max-tokens negative": lambda t: ["--max-tokens", "-3"],
    "max-tokens not a number": lambda t: ["--max-tokens", "lots"],
    "max-tokens fractional": lambda t: ["--max-tokens", "2.5"],
    "max-tokens under one window": lambda t: ["--max-tokens", "100"],
    "context zero": lambda t: ["--context", "0"],
    "context over the model's limit": lambda t: ["--context", "100000"],
    "unknown flag": lambda t: ["--bogus", "1"],
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_error_line(case, tmp_path, capsys):
    assert main(["eval", *BAD[case](tmp_path), "--json"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.out == ""
    if case == "encoder":
        assert lines[0] == "error: eval measures next-token perplexity; minilm is an encoder"


def test_bad_text_in_a_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sam_viz", "eval", "--text", str(tmp_path / "none.txt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr


@pytest.mark.parametrize("spec", DEMO_SPECS)
def test_demo_spec_loads_offline_and_encodes_with_the_special_token_first(spec):
    assert spec in BUILTIN_SPECS
    loaded = shared(spec)
    assert loaded.kind == "causal-lm" and loaded.model_type == "llama"
    ids = loaded.encode("The list type")["input_ids"][0].tolist()
    special = loaded.tokenizer.convert_tokens_to_ids(SEP)
    assert ids == [special, *loaded.plain_ids("The list type")]
    assert loaded.model.config.bos_token_id == special


@pytest.mark.parametrize("spec", DEMO_SPECS)
@pytest.mark.parametrize("policy", ["topk", "threshold"])
def test_analyze_json_runs_on_demo_specs(spec, policy, capsys):
    assert main(["analyze", "--model", spec, "--prompt", "To open a file, call", "--policy", policy,
                 "--density", "0.1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"][0] == SEP and len(out["layers"]) == 4
    assert set(out["compare"]) == {"kl", "top1_agreement", "max_abs_diff"} and out["compare"]["kl"] >= 0


def test_shipped_folder_is_an_allowed_root_without_traversal(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM_VIZ_MODEL_ROOTS", str(tmp_path))
    assert load_model(str(DEMO_DIR / "demo-lm-dense")).kind == "causal-lm"
    with pytest.raises(InputError, match="outside the allowed roots"):
        load_model(str(DEMO_DIR / "demo-lm-dense" / ".." / ".."))


def test_missing_demo_weights_give_one_sentence(tmp_path, monkeypatch, capsys):
    (tmp_path / "demo-lm").mkdir()
    shutil.copy(DEMO_DIR / "demo-lm" / "config.json", tmp_path / "demo-lm")
    monkeypatch.setattr("sam_viz.models.loading.DEMO_DIR", tmp_path)
    with pytest.raises(InputError, match="shipped model 'demo-lm' is missing its files"):
        load_model("demo-lm")
    assert main(["eval", "--model", "demo-lm-dense"]) == 2
    assert capsys.readouterr().err.startswith("error: the shipped model 'demo-lm-dense' is missing")


def test_app_lists_the_demo_specs_and_opens_one(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAM_VIZ_RUN_DB", str(tmp_path / "runs.sqlite"))
    at = AppTest.from_file(str(ROOT / "pages" / "compare.py"), default_timeout=180)
    at.query_params.update(model="demo-lm", prompt="The for statement", policy="topk", density="0.1")
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert set(DEMO_SPECS) <= set(at.selectbox(key="model").options)
    assert at.session_state["ctx"].analysis.spec.model == "demo-lm"


@pytest.mark.parametrize("path, message", [("/dev/zero", "is not a regular file"), ("a\x00b.txt", "holds a NUL"),
                                           ("/nonexistent/x.txt", "does not exist")])
def test_each_unusable_text_file_gets_its_own_sentence(path, message, capsys):
    """The reader's checks each name their own reason (a device was once reported as a NUL in the name)."""
    assert main(["eval", "--model", "tiny-llama", "--max-tokens", "128", "--text", path]) == 2
    assert message in capsys.readouterr().err
