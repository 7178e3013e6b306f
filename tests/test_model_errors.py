"""Broken checkpoints (issue 15): missing or corrupt safetensors, a config that asks for absurd sizes
(refused from its sizes, before anything is allocated), an unsupported architecture, a tokenizer with
more tokens than the model has embedding rows. Each is one sentence from load_model, exit 2 with one
`error:` line in the CLI, and one st.error in the app, whose session then goes on with a good model."""
import json
import shutil

import pytest
from streamlit.testing.v1 import AppTest

from sam_viz.models import InputError, load_model
from sam_viz.models.loading import MAX_PARAMS, estimate_params, minilm_path
from test_app import ROOT
from test_hardening_cli import run_cli


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    """A small Llama checkpoint folder: config.json, model.safetensors and minilm's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("ckpt") / "good"
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def root(tmp_path, monkeypatch, good_checkpoint):
    monkeypatch.setenv("SAM_VIZ_MODEL_ROOTS", str(tmp_path))
    monkeypatch.setenv("SAM_VIZ_RUN_DB", str(tmp_path / "runs.sqlite"))

    def variant(name: str, edit) -> str:
        path = tmp_path / name
        shutil.copytree(good_checkpoint, path)
        edit(path)
        return str(path)
    return variant


def _config(path, **changes):
    data = json.loads((path / "config.json").read_text())
    data.update(changes)
    (path / "config.json").write_text(json.dumps(data))


def _small_vocab(path):
    """Weights and config for 100 tokens, beside a tokenizer of 30,522."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(path)
    config.vocab_size = 100
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)


BROKEN = {
    "no-weights": (lambda p: (p / "model.safetensors").unlink(), "has no safetensors weights"),
    "corrupt-weights": (lambda p: (p / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"),
                        "cannot load"),
    "truncated-weights": (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:5000]),
                          "cannot load"),
    "huge": (lambda p: _config(p, hidden_size=10**6, vocab_size=10**9), "parameters; the limit is"),
    "negative": (lambda p: _config(p, num_hidden_layers=-3), "is not a whole number"),
    "not-json": (lambda p: (p / "config.json").write_text("{oops"), "cannot read the config"),
    "unsupported": (lambda p: _config(p, model_type="mamba"), "is not supported"),
    "unknown-family": (lambda p: _config(p, model_type="no-such-family"), "is not supported"),
    "small-vocab": (_small_vocab, "does not match the model"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_checkpoint_is_one_sentence(root, case):
    edit, words = BROKEN[case]
    spec = root(case, edit)
    with pytest.raises(InputError, match=words):
        load_model(spec)
    rc, out, err = run_cli(["analyze", "--model", spec, "--prompt", "One two three."])
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err, err


def test_the_good_checkpoint_loads(root):
    loaded = load_model(root("ok", lambda p: None))
    assert loaded.kind == "causal-lm" and loaded.d_ff == 64


def test_an_unsupported_family_lists_the_supported_ones(root):
    with pytest.raises(InputError) as exc:
        load_model(root("mamba", lambda p: _config(p, model_type="mamba")))
    assert all(f in str(exc.value) for f in ("llama", "bert", "gpt2"))


def test_the_size_estimate_follows_the_equation():
    """Llama-7B's sizes: 32000 x 4096 embeddings, and per layer 4 d^2 (attention) + 3 d d_ff (GLU MLP)."""
    llama7b = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)
    assert estimate_params(llama7b) == 32000 * 4096 + 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    assert estimate_params(llama7b) < MAX_PARAMS < estimate_params(dict(llama7b, hidden_size=10**6))
    mixtral = dict(llama7b, intermediate_size=14336, num_local_experts=8)
    assert estimate_params(mixtral) == 32000 * 4096 + 32 * (4 * 4096**2 + 8 * 3 * 4096 * 14336)


def test_the_app_says_it_in_one_error_and_keeps_serving(root):
    spec = root("huge", BROKEN["huge"][0])
    at = AppTest.from_file(str(ROOT / "pages" / "firing.py"), default_timeout=240)
    at.query_params.update(model=spec, prompt="One two three.")
    at.run()
    assert not at.exception and len(at.error) == 1 and "parameters; the limit is" in at.error[0].value
    at.selectbox(key="model").set_value("tiny-llama").run()
    assert not at.exception and not at.error and at.get("plotly_chart")
