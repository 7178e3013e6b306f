"""Scope all (DESIGN.md, "Sparsity on every projection"): every projection of every block reads only the
kept entries of its input. References are written here, independent of sparse_ops:

- masks by hand: topk keeps the k = round(density * d_in) largest |x_i| per token (numpy's stable
  argsort, so ties go to the lower index), teal |x_i| > t, wina |x_i| * ||W[:, i]||_2 > t, with the
  thresholds of a calibration object made here;
- a fresh Hugging Face copy of each checkpoint (from_pretrained, no sam-viz module in it) with those
  masks applied by forward pre-hooks on its projections, and, for MoE experts (one module for the whole
  bank), a forward hook that returns the experts' equation written out per token.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from sam_viz.models import InputError, load_model
from sam_viz.sparse_ops import Policy, sparsified
from sam_viz.sparse_ops.inputs import InputRecorder
from test_moe_families import TINY as MOE_TINY, byte_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Every projection reads only a few entries of its input, token by token."
DENSE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)
CONFIGS = {   # model_type: (config, what it shows)
    "gpt2": (dict(n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=128), "fused qkv, Conv1D"),
    "gpt_neox": (DENSE, "fused qkv, parallel attention and MLP"),
    "llama": (DENSE | dict(num_key_value_heads=2), "grouped-query attention"),
    "phi3": (DENSE | dict(num_key_value_heads=2), "fused qkv and fused gate_up"),
    "opt": (dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                 max_position_embeddings=128), "out_proj, fc1 / fc2"),
    "bert": (DENSE, "an encoder"),
    "mixtral": (MOE_TINY, "MoE, routed experts only"),
    "qwen2_moe": (MOE_TINY, "MoE with a sigmoid-gated shared expert"),
    "deepseek_v3": (MOE_TINY | dict(num_key_value_heads=4), "MLA with a low-rank q, dense then MoE layers"),
    "deepseek_v3-q": (MOE_TINY | dict(num_key_value_heads=4, q_lora_rank=None), "MLA with a full-rank q"),
}
NOT_PROJECTIONS = ("shared_expert_gate",)          # a d -> 1 gate, as the routers: stays dense


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name -> path of a tiny random checkpoint (weights N(0, 0.3^2), seed 0), built once."""
    root = tmp_path_factory.mktemp("scope-all")
    tok, made = byte_tokenizer(), {}
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAM_VIZ_MODEL_ROOTS", str(root))

        def get(name):
            if name not in made:
                config = AutoConfig.for_model(name.split("-")[0], **CONFIGS[name][0], **ids)
                auto = AutoModel if config.model_type == "bert" else AutoModelForCausalLM
                model = auto.from_config(config, dtype=torch.float32)
                gen = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    for p in model.parameters():
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
                model.save_pretrained(root / name)
                tok.save_pretrained(root / name)
                made[name] = root / name
            return made[name]
        yield get


def topk_keep(x: torch.Tensor, density: float) -> torch.Tensor:
    """[..., d] bool: the k = round(density * d) (at least 1) largest |x_i| of each row, ties to the lower index."""
    d = x.shape[-1]
    k = min(d, max(1, round(density * d)))
    a = x.detach().abs().reshape(-1, d).numpy()
    order = np.argsort(-a, axis=-1, kind="stable")[:, :k]
    keep = np.zeros(a.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return torch.from_numpy(keep).reshape(x.shape)


def _fresh(path, model_type):
    auto = AutoModel if model_type == "bert" else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=torch.float32).eval()


def _layers(model):
    base = model.base_model
    for path in ("layers", "h", "decoder.layers", "encoder.layer"):
        obj = base
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    raise AssertionError("no layers")


def _hook_everything(model, keep):
    """Pre-hooks masking the input of every projection in the blocks (keep(x) -> bool mask), and a hook
    on each MoE expert bank returning sum over picked experts e of w_e * W_down[e] (h * keep(h)), with
    h = act(gate) * up of W_gate_up[e] (x * keep(x)). Returns the handles."""
    handles = []
    for layer in _layers(model):
        for name, module in layer.named_modules():
            if isinstance(module, (torch.nn.Linear, Conv1D)) and not name.endswith(NOT_PROJECTIONS):
                handles.append(module.register_forward_pre_hook(
                    lambda mod, args: (args[0] * keep(args[0]),) + args[1:]))
            if hasattr(module, "gate_up_proj") and isinstance(module.gate_up_proj, torch.nn.Parameter):
                handles.append(module.register_forward_hook(lambda mod, args, out: _experts(mod, *args, keep=keep)))
    return handles


def _experts(bank, x, index, weights, keep):
    y = torch.zeros_like(x)                                            # [N, d]
    for t in range(x.shape[0]):
        xt = x[t] * keep(x[t][None])[0]
        for e, w in zip(index[t].tolist(), weights[t]):
            gate, up = (bank.gate_up_proj[e] @ xt).chunk(2)
            h = bank.act_fn(gate) * up
            y[t] += w * (bank.down_proj[e] @ (h * keep(h[None])[0]))
    return y


def _out(model, enc, model_type):
    with torch.no_grad():
        out = model(**enc)
    return out.last_hidden_state if model_type == "bert" else out.logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_topk_everywhere_equals_hooks_on_a_fresh_model(name, checkpoint):
    """Whole-model topk at 0.5 and 0.3: the same outputs (<= 1e-4) as the fresh copy with the masks by hand."""
    path, model_type = checkpoint(name), name.split("-")[0]
    loaded, fresh = load_model(str(path)), _fresh(path, model_type)
    enc = loaded.encode(PROMPT)
    dense = _out(fresh, enc, model_type)
    for density in (0.5, 0.3):
        handles = _hook_everything(fresh, lambda x: topk_keep(x, density))
        try:
            expected = _out(fresh, enc, model_type)
        finally:
            for h in handles:
                h.remove()
        with sparsified(loaded, Policy("topk", density, scope="all"), kernel="reference"):
            got = _out(loaded.model, enc, model_type)
        assert (got - expected).abs().max() <= 1e-4, (name, density)
        assert (got - dense).abs().max() > 1e-3, "the masks changed nothing: the comparison would not tell"
    assert (_out(loaded.model, enc, model_type) - dense).abs().max() <= 1e-5        # outside the run: as shipped


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2_moe", "deepseek_v3"])
def test_density_one_and_dense_under_scope_all_reproduce_the_model(name, checkpoint):
    path, model_type = checkpoint(name), name.split("-")[0]
    loaded, fresh = load_model(str(path)), _fresh(path, model_type)
    enc = loaded.encode(PROMPT)
    expected = _out(fresh, enc, model_type)
    for policy in (Policy("dense", scope="all"), Policy("topk", 1.0, scope="all")):
        rec = InputRecorder(keep_masks=True)
        with sparsified(loaded, policy, kernel="reference", inputs=rec):
            got = _out(loaded.model, enc, model_type)
        assert (got - expected).abs().max() <= 1e-5, policy
        assert rec.model_density(enc["input_ids"].shape[1]) == 1.0
