"""Loading: every built-in spec, checkpoint directories under allowed roots, hf: from the cache."""
import json

import pytest
import torch

from conftest import ALL_SPECS, model_output, shared
from sam_viz.models import InputError, load_model

EXPECTED = {  # (kind, n_layers, d_ff, n_experts)
    "minilm": ("encoder", 6, 1536, 0), "demo-lm": ("causal-lm", 4, 1024, 0),
    "demo-lm-dense": ("causal-lm", 4, 1024, 0), "demo-lm-all": ("causal-lm", 4, 1024, 0), "tiny-llama": ("causal-lm", 2, 128, 0),
    "tiny-mistral": ("causal-lm", 2, 128, 0), "tiny-qwen2": ("causal-lm", 2, 128, 0),
    "tiny-gpt2": ("causal-lm", 2, 128, 0), "tiny-opt": ("causal-lm", 2, 128, 0),
    "tiny-bert": ("encoder", 2, 128, 0), "tiny-mixtral": ("causal-lm", 2, 64, 4),
}


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_builtin_specs_load(spec):
    m = shared(spec)
    assert (m.kind, m.n_layers, m.d_ff, m.n_experts) == EXPECTED[spec]
    assert m.model.config.vocab_size >= len(m.tokenizer)
    enc = m.encode("A short test sentence.")
    assert torch.isfinite(model_output(m, enc)).all()


def test_tiny_models_are_deterministic(fresh):
    a, b = fresh("tiny-llama"), fresh("tiny-llama")
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def _save(loaded, path):
    loaded.model.save_pretrained(path, safe_serialization=True)
    loaded.tokenizer.save_pretrained(path)


def test_checkpoint_dir_under_allowed_root(tmp_path, monkeypatch, fresh):
    src = fresh("tiny-gpt2")
    _save(src, tmp_path / "ckpt")
    monkeypatch.setenv("SAM_VIZ_MODEL_ROOTS", str(tmp_path))
    m = load_model(str(tmp_path / "ckpt"))
    assert m.kind == "causal-lm" and m.model_type == "gpt2"
    enc = m.encode("same weights, same logits")
    torch.testing.assert_close(model_output(m, enc), model_output(src, enc), rtol=0, atol=1e-6)


def test_checkpoint_outside_roots_and_traversal(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM_VIZ_MODEL_ROOTS", str(tmp_path / "allowed"))
    (tmp_path / "allowed").mkdir()
    for bad in ["/etc", str(tmp_path), str(tmp_path / "allowed" / ".." / ".."), "../../x", "~/x"]:
        with pytest.raises(InputError, match="outside the allowed roots"):
            load_model(bad)
    with pytest.raises(InputError, match="no config.json"):
        load_model(str(tmp_path / "allowed"))


def test_unsupported_model_type_names_it(tmp_path, monkeypatch):
    ckpt = tmp_path / "t5"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 32}))
    monkeypatch.setenv("SAM_VIZ_MODEL_ROOTS", str(tmp_path))
    with pytest.raises(InputError, match=r"model_type 't5' is not supported; supported: .*bert.*llama"):
        load_model(str(ckpt))


def test_pickle_checkpoints_are_refused(tmp_path, monkeypatch, fresh):
    src = fresh("tiny-llama")
    ckpt = tmp_path / "pickled"
    src.model.config.save_pretrained(ckpt)
    torch.save(src.model.state_dict(), ckpt / "pytorch_model.bin")
    monkeypatch.setenv("SAM_VIZ_MODEL_ROOTS", str(tmp_path))
    with pytest.raises(InputError, match="no safetensors"):
        load_model(str(ckpt))


def test_hf_spec_reads_local_cache(tmp_path, monkeypatch, fresh):
    """hf:org/name resolves through the Hugging Face cache layout, offline."""
    src = fresh("tiny-llama")
    repo = tmp_path / "hub" / "models--acme--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    _save(src, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    m = load_model("hf:acme/tiny")
    enc = m.encode("from the cache")
    torch.testing.assert_close(model_output(m, enc), model_output(src, enc), rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="not found in the local Hugging Face cache"):
        load_model("hf:acme/absent")
    for bad in ["hf:../../etc", "hf:a/b/c", "hf:"]:
        with pytest.raises(InputError, match="not a valid Hugging Face model name"):
            load_model(bad)


@pytest.mark.parametrize("bad", ["", "   ", "no-such-model", "x" * 5000])
def test_bad_specs_are_one_sentence(bad):
    with pytest.raises(InputError) as info:
        load_model(bad)
    assert "\n" not in str(info.value)
